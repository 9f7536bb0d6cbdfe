// Latency floor for paced fan-out on loopback, without a gateway, Redis or a real client: one
// process writes F fan-outs per second, each one 110-byte frame to each of G consecutive sockets
// of K (as the latency scenario's 1,000 topics x 10 subscribers at 5,000 publications/s do), and
// a forked reader drains all K sockets with epoll and measures each frame from the time its
// fan-out started (CLOCK_MONOTONIC, in the frame) to the moment the reader has it: the part of
// publish-to-receive that is the kernel's and the scheduler's alone on this machine.
//
//   cc -O2 -o latency_floor loadtest/tools/latency_floor.c
//   ./latency_floor K G F SECONDS        # e.g. 10000 10 5000 10
//
// Prints p50 / p99 / p99.9 / max (ms), frames read against written, and the writer's CPU per frame.
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
#include <signal.h>
#include <arpa/inet.h>
#include <sys/socket.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <netinet/tcp.h>

enum { FRAME = 110, BUCKETS = 1000000 }; // latency buckets of 1 us, up to 1 s

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static double cpu_seconds(void) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return r.ru_utime.tv_sec + r.ru_stime.tv_sec + (r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1e6;
}

static double percentile(const uint32_t *hist, uint64_t n, double q) {
    uint64_t want = (uint64_t)(q * (double)n), seen = 0;
    for (int i = 0; i < BUCKETS; i++) {
        seen += hist[i];
        if (seen > want) return i / 1000.0;
    }
    return BUCKETS / 1000.0;
}

// Reads until every socket is closed; frames arrive whole or split, 110 bytes each.
static void reader(int *cs, int k, uint64_t expected) {
    int ep = epoll_create1(0);
    unsigned char (*partial)[FRAME] = calloc(k, FRAME);
    int *have = calloc(k, sizeof *have);
    uint32_t *hist = calloc(BUCKETS, sizeof *hist);
    uint64_t n = 0, max_us = 0;
    for (int i = 0; i < k; i++) {
        struct epoll_event e = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, cs[i], &e);
    }
    int open = k;
    struct epoll_event events[256];
    unsigned char buf[65536];
    while (open > 0) {
        int m = epoll_wait(ep, events, 256, 5000);
        if (m <= 0) break;
        uint64_t at = now_ns();
        for (int j = 0; j < m; j++) {
            int i = (int)events[j].data.u32;
            ssize_t r = read(cs[i], buf, sizeof buf);
            if (r <= 0) { epoll_ctl(ep, EPOLL_CTL_DEL, cs[i], NULL); close(cs[i]); open--; continue; }
            for (ssize_t off = 0; off < r;) {
                int take = FRAME - have[i];
                if (take > r - off) take = (int)(r - off);
                memcpy(partial[i] + have[i], buf + off, (size_t)take);
                have[i] += take;
                off += take;
                if (have[i] == FRAME) {
                    uint64_t due;
                    memcpy(&due, partial[i] + 2, sizeof due);
                    uint64_t us = at > due ? (at - due) / 1000 : 0;
                    if (us > max_us) max_us = us;
                    hist[us < BUCKETS ? us : BUCKETS - 1]++;
                    n++;
                    have[i] = 0;
                }
            }
        }
    }
    printf("read %llu of %llu frames; latency (ms) p50 %.3f  p99 %.3f  p99.9 %.3f  max %.3f\n",
           (unsigned long long)n, (unsigned long long)expected, percentile(hist, n, 0.5),
           percentile(hist, n, 0.99), percentile(hist, n, 0.999), max_us / 1000.0);
}

int main(int argc, char **argv) {
    if (argc < 5) { fprintf(stderr, "usage: %s K G F SECONDS\n", argv[0]); return 2; }
    int k = atoi(argv[1]), g = atoi(argv[2]), f = atoi(argv[3]), secs = atoi(argv[4]);
    if (k <= 0 || g <= 0 || g > k || f <= 0 || secs <= 0) { fprintf(stderr, "bad arguments\n"); return 2; }
    struct rlimit fds = {(rlim_t)k * 2 + 64, (rlim_t)k * 2 + 64};
    setrlimit(RLIMIT_NOFILE, &fds);
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(0x7f000001);
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(ls, (void *)&a, sizeof a) || listen(ls, 4096)) { perror("listen"); return 1; }
    socklen_t l = sizeof a;
    getsockname(ls, (void *)&a, &l);
    int *cs = malloc((size_t)k * sizeof *cs), *ss = malloc((size_t)k * sizeof *ss);
    long fanouts = (long)f * secs;
    uint64_t expected = (uint64_t)fanouts * (uint64_t)g;
    pid_t pid = fork();
    if (pid == 0) {
        for (int i = 0; i < k; i++) {
            cs[i] = socket(AF_INET, SOCK_STREAM, 0);
            if (connect(cs[i], (void *)&a, sizeof a)) { perror("connect"); _exit(1); }
        }
        reader(cs, k, expected);
        fflush(stdout);
        _exit(0);
    }
    for (int i = 0; i < k; i++) {
        ss[i] = accept(ls, 0, 0);
        setsockopt(ss[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    sleep(1); // the reader is in epoll_wait before the first fan-out
    unsigned char msg[FRAME];
    memset(msg, 'x', FRAME);
    msg[0] = 0x81;
    msg[1] = FRAME - 2;
    uint64_t start = now_ns() + 1000000, period = 1000000000u / (uint64_t)f;
    long written = 0, late = 0;
    double c0 = cpu_seconds();
    for (long n = 0; n < fanouts; n++) {
        uint64_t due = start + (uint64_t)n * period;
        struct timespec t = {(time_t)(due / 1000000000u), (long)(due % 1000000000u)};
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL);
        // Stamped when the fan-out starts, as the load generator stamps a publication when it
        // sends it: a writer running late shows in `late`, not in the latency.
        uint64_t sent = now_ns();
        if (sent > due + 1000000) late++;
        memcpy(msg + 2, &sent, sizeof sent);
        int first = (int)((n * g) % k);
        for (int j = 0; j < g; j++)
            if (write(ss[(first + j) % k], msg, FRAME) == FRAME) written++;
    }
    double c1 = cpu_seconds();
    for (int i = 0; i < k; i++) close(ss[i]);
    int status;
    waitpid(pid, &status, 0);
    printf("wrote %ld frames in %ld fan-outs of %d (%ld started over 1 ms late); writer CPU %.3f s = "
           "%.3f us per frame\n",
           written, fanouts, g, late, c1 - c0, (c1 - c0) / (double)written * 1e6);
    return 0;
}
