// What io_uring would take off the fan-out floor: CPU (user+sys) per 110-byte frame sent to K
// loopback TCP sockets, one frame per socket, with one write() per socket against io_uring with
// Q sends (to Q different sockets) per submission, alternately, three rounds each in one run
// (the first write round also warms the sockets up: compare rounds 2 and 3). A reader process
// drains the sockets, as in send_floor.c. Needs liburing (Debian: liburing-dev):
//   cc -O2 -o send_floor_uring loadtest/tools/send_floor_uring.c -luring
//   ./send_floor_uring 10000 10 32      # K sockets, M frames per socket per round, Q
#include <liburing.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <arpa/inet.h>
#include <unistd.h>

static double cpu(void) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return r.ru_utime.tv_sec + r.ru_stime.tv_sec + (r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1e6;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s SOCKETS FRAMES_PER_SOCKET SENDS_PER_SUBMIT\n", argv[0]);
        return 2;
    }
    int K = atoi(argv[1]), M = atoi(argv[2]), Q = atoi(argv[3]);
    if (K < 1 || M < 1 || Q < 1) {
        fprintf(stderr, "all three must be positive\n");
        return 2;
    }
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(0x7f000001);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    bind(ls, (void *)&a, sizeof a);
    listen(ls, 4096);
    socklen_t l = sizeof a;
    getsockname(ls, (void *)&a, &l);
    int *ss = malloc(K * sizeof(int));
    pid_t pid = fork();
    if (pid == 0) {  // reader: connect K sockets, drain forever
        struct pollfd *p = calloc(K, sizeof *p);
        char buf[65536];
        for (int i = 0; i < K; i++) {
            p[i].fd = socket(AF_INET, SOCK_STREAM, 0);
            connect(p[i].fd, (void *)&a, sizeof a);
            p[i].events = POLLIN;
        }
        for (;;) {
            poll(p, K, 1000);
            for (int i = 0; i < K; i++)
                if ((p[i].revents & POLLIN) && read(p[i].fd, buf, sizeof buf) <= 0) _exit(0);
        }
    }
    for (int i = 0; i < K; i++) {
        ss[i] = accept(ls, 0, 0);
        setsockopt(ss[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    char msg[110];
    memset(msg, 'x', sizeof msg);
    msg[0] = (char)0x81;  // a final text frame of 108 bytes, as in send_floor.c
    msg[1] = 108;
    struct io_uring ring;
    if (io_uring_queue_init(Q, &ring, 0) < 0) {
        perror("io_uring_queue_init");
        kill(pid, 9);
        return 1;
    }
    for (int round = 1; round <= 3; round++) {
        double c0 = cpu();
        long n = 0;
        for (int m = 0; m < M; m++)
            for (int i = 0; i < K; i++)
                if (write(ss[i], msg, sizeof msg) == (ssize_t)sizeof msg) n++;
        double c1 = cpu();
        printf("round %d, one write per frame: %ld frames, %.3f us/frame\n", round, n,
               (c1 - c0) / n * 1e6);
        c0 = cpu();
        n = 0;
        for (int m = 0; m < M; m++)
            for (int i = 0; i < K; i += Q) {
                int q = K - i < Q ? K - i : Q;
                for (int j = 0; j < q; j++)
                    io_uring_prep_send(io_uring_get_sqe(&ring), ss[i + j], msg, sizeof msg, 0);
                io_uring_submit_and_wait(&ring, q);
                struct io_uring_cqe *c;
                unsigned head, seen = 0;
                io_uring_for_each_cqe(&ring, head, c) {
                    if (c->res == (int)sizeof msg) n++;
                    seen++;
                }
                io_uring_cq_advance(&ring, seen);
            }
        c1 = cpu();
        printf("round %d, io_uring, %d sends per submit: %ld frames, %.3f us/frame\n", round, Q, n,
               (c1 - c0) / n * 1e6);
    }
    kill(pid, 9);
    return 0;
}
