//! The io_uring receive loop: once a worker's connections are open, every socket gets one
//! multishot `recvmsg` on one ring, and the worker thread reaps what all of them received with
//! one system call per wait instead of an `epoll_wait` plus a `recvmsg` per readable socket.
//!
//! Why: in the latency scenario the generator's receive path (epoll, `recvmsg`, the wake-ups)
//! took as much CPU per message as the node under test spends per delivery, on the same two
//! vCPUs, so the node, Redis and the generator queued behind each other and the measured tail
//! was partly the generator's own. A lighter reader leaves more of the machine to whatever
//! server is measured, the same way for all of them.
//!
//! Shape: buffers come from a provided-buffer ring (the kernel picks one per receive and hands
//! its id back in the completion; the loop copies the bytes into the connection's [`Frames`]
//! and returns the buffer at once). Each receive carries its `SO_TIMESTAMPNS` control message
//! in the same buffer, so arrival at the socket is measured as on the tokio path. The ring is
//! set up `SINGLE_ISSUER | DEFER_TASKRUN`: the kernel does the receive work only when this
//! thread asks for completions, so the copies for many sockets run in one go.
//!
//! Writes (pongs, engine.io's "3") are rare and tiny and go out with a plain `write`.

use std::io::Write;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, types, IoUring};

use crate::frames::Frames;

/// Buffers in the provided ring (a power of two, at most 32768).
const BUFFERS: u16 = 4096;
/// Bytes per buffer: the receive header, the control message and the data of one read.
const BUFFER_SIZE: usize = 4096;
/// Room for one `SCM_TIMESTAMPNS` control message (CMSG_SPACE of a timespec is 32 bytes).
const CONTROL_LEN: usize = 64;
const GROUP: u16 = 0;

/// One connection handed to the loop: its index among the worker's connections, the socket
/// and what was read before the hand-over.
pub struct Conn {
    pub j: usize,
    pub stream: TcpStream,
    pub frames: Frames,
}

/// What the caller wants done after one message or close.
pub enum Next {
    Continue,
    /// Send these bytes (an already framed reply) and continue.
    Reply(Vec<u8>),
    /// Stop reading this connection.
    Done,
}

/// What happened on a connection, for the caller's bookkeeping.
pub enum Happened<'a> {
    Message(&'a [u8], Option<u64>),
    Closed(Option<u16>),
    Failed(String),
}

/// The ring and its provided buffers. Built before the connections open, so that a kernel
/// without io_uring is found out while the tokio path can still take over.
pub struct Ring {
    ring: IoUring,
    /// The provided-buffer ring: `count` 16-byte entries, page-aligned, shared with the kernel.
    entries: *mut types::BufRingEntry,
    /// Buffers (and ring entries): a power of two.
    count: u16,
    entries_layout: std::alloc::Layout,
    /// The buffers the entries point at.
    buffers: Box<[u8]>,
    /// The next tail to publish (wrapping, as the kernel reads it).
    tail: u16,
    /// The msghdr every receive is prepared from (only its name and control lengths matter);
    /// boxed so that its address stays put while requests refer to it.
    template: Box<libc::msghdr>,
}

impl Ring {
    pub fn new(sockets: usize) -> std::io::Result<Ring> {
        Ring::with_buffers(sockets, BUFFERS)
    }

    /// A ring with `count` buffers (a power of two); fewer than the sockets make receives run
    /// out of buffers (`ENOBUFS`) and be armed again, which the loop handles.
    fn with_buffers(sockets: usize, count: u16) -> std::io::Result<Ring> {
        assert!(count.is_power_of_two(), "{count} buffers");
        let sq = (sockets.next_power_of_two() as u32).clamp(256, 4096);
        let cq = (sockets.next_power_of_two() as u32 * 2).clamp(1024, 65536);
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_cqsize(cq)
            .build(sq)?;
        let entries_layout =
            std::alloc::Layout::from_size_align(count as usize * 16, 4096).expect("valid");
        // SAFETY: a non-zero size; freed in Drop with the same layout.
        let entries =
            unsafe { std::alloc::alloc_zeroed(entries_layout) } as *mut types::BufRingEntry;
        if entries.is_null() {
            return Err(std::io::ErrorKind::OutOfMemory.into());
        }
        // SAFETY: `msghdr` is plain data.
        let mut template: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        template.msg_controllen = CONTROL_LEN as _;
        let mut ring = Ring {
            ring,
            entries,
            count,
            entries_layout,
            buffers: vec![0u8; count as usize * BUFFER_SIZE].into_boxed_slice(),
            tail: 0,
            template,
        };
        for bid in 0..count {
            ring.give_back(bid);
        }
        ring.publish_tail();
        // SAFETY: the entries stay allocated (and the buffers they point at) until Drop, which
        // runs after the ring (a field declared first) is torn down.
        unsafe {
            ring.ring.submitter().register_buf_ring_with_flags(
                ring.entries as u64,
                count,
                GROUP,
                0,
            )?;
        }
        Ok(ring)
    }

    /// Puts buffer `bid` back at the ring's tail (seen by the kernel at [`Ring::publish_tail`]).
    fn give_back(&mut self, bid: u16) {
        let slot = (self.tail & (self.count - 1)) as usize;
        // SAFETY: `slot` < `count` entries; the kernel does not read entries past the published
        // tail, and this one is past it until published.
        let entry = unsafe { &mut *self.entries.add(slot) };
        entry.set_addr(self.buffers.as_ptr() as u64 + bid as u64 * BUFFER_SIZE as u64);
        entry.set_len(BUFFER_SIZE as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish_tail(&mut self) {
        // SAFETY: the tail field of the first entry, aligned for a u16; the kernel reads it
        // with acquire semantics, so a release store publishes the entries written before.
        unsafe {
            let tail =
                types::BufRingEntry::tail(self.entries) as *const std::sync::atomic::AtomicU16;
            (*tail).store(self.tail, std::sync::atomic::Ordering::Release);
        }
    }

    /// Queues a multishot receive on `conns[k]`, submitting first if the queue is full.
    fn arm(&mut self, k: usize, conns: &[Option<Conn>]) -> std::io::Result<()> {
        let Some(conn) = &conns[k] else {
            return Ok(());
        };
        let entry = opcode::RecvMsgMulti::new(
            types::Fd(conn.stream.as_raw_fd()),
            &*self.template as *const libc::msghdr,
            GROUP,
        )
        .build()
        .user_data(k as u64);
        loop {
            // SAFETY: the msghdr and the buffers outlive every request (owned by `self`).
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    /// Receives on every connection until `stop` says so: each message, close or failure goes
    /// to `on`, and `tick` runs about every `tick_every`.
    pub fn run(
        mut self,
        conns: Vec<Conn>,
        shared_inflater: &std::cell::RefCell<flate2::Decompress>,
        mut on: impl FnMut(usize, Happened<'_>) -> Next,
        mut tick: impl FnMut() -> bool,
        tick_every: Duration,
    ) -> std::io::Result<()> {
        let mut conns: Vec<Option<Conn>> = conns.into_iter().map(Some).collect();
        // Messages that arrived with the subscribe answer, before the hand-over.
        for conn in conns.iter_mut() {
            drain(conn, shared_inflater, &mut on);
        }
        for k in 0..conns.len() {
            self.arm(k, &conns)?;
        }
        let mut rearm = Vec::new();
        let mut next_tick = Instant::now() + tick_every;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            let ts = types::Timespec::new()
                .sec(wait.as_secs())
                .nsec(wait.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
                Err(e) => return Err(e),
            }
            let mut returned = Vec::new();
            for cqe in self.ring.completion() {
                let k = cqe.user_data() as usize;
                let flags = cqe.flags();
                let more = cqueue::more(flags);
                if let Some(bid) = cqueue::buffer_select(flags) {
                    returned.push(bid);
                    let at = bid as usize * BUFFER_SIZE;
                    let len = (cqe.result().max(0) as usize).min(BUFFER_SIZE);
                    let buffer = &self.buffers[at..at + len];
                    received(
                        &mut conns[k],
                        buffer,
                        &self.template,
                        shared_inflater,
                        &mut on,
                    );
                } else if cqe.result() < 0 {
                    let errno = -cqe.result();
                    if errno == libc::ENOBUFS {
                        // Every buffer was in use: the request ended; it is armed again below.
                    } else if let Some(c) = conns[k].take() {
                        let e = std::io::Error::from_raw_os_error(errno);
                        on(c.j, Happened::Failed(format!("recvmsg: {e}")));
                    }
                }
                if !more && conns[k].is_some() {
                    rearm.push(k);
                }
            }
            for bid in returned {
                self.give_back(bid);
            }
            self.publish_tail();
            for k in rearm.drain(..) {
                self.arm(k, &conns)?;
            }
            if Instant::now() >= next_tick {
                next_tick += tick_every;
                if !tick() {
                    return Ok(());
                }
            }
        }
    }
}

/// One completed receive on `conn`: its data goes into the connection's frames, and every
/// message now complete to `on`. An empty read is the end of the stream.
fn received(
    conn: &mut Option<Conn>,
    buffer: &[u8],
    template: &libc::msghdr,
    shared_inflater: &std::cell::RefCell<flate2::Decompress>,
    on: &mut impl FnMut(usize, Happened<'_>) -> Next,
) {
    let Some(c) = conn else {
        return;
    };
    let Ok(out) = types::RecvMsgOut::parse(buffer, template) else {
        let j = c.j;
        on(j, Happened::Failed("recvmsg: short completion".into()));
        *conn = None;
        return;
    };
    let payload = out.payload_data();
    if payload.is_empty() {
        let j = c.j;
        on(j, Happened::Closed(None));
        *conn = None;
        return;
    }
    let control = out.control_data();
    // SAFETY: plain data; pointed at the control bytes only for `receive_stamp` to walk them.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_control = control.as_ptr() as *mut libc::c_void;
    msg.msg_controllen = control.len() as _;
    let stamp = crate::client::receive_stamp(&msg);
    c.frames.feed(payload, stamp);
    drain(conn, shared_inflater, on);
}

/// Hands every complete message in `conn`'s frames to `on`, and sends what is owed back.
fn drain(
    conn: &mut Option<Conn>,
    shared_inflater: &std::cell::RefCell<flate2::Decompress>,
    on: &mut impl FnMut(usize, Happened<'_>) -> Next,
) {
    let Some(c) = conn else {
        return;
    };
    let j = c.j;
    let done = loop {
        let next = match c.frames.step(shared_inflater) {
            Ok(crate::frames::Step::Message) => {
                let (m, arrived) = c.frames.message();
                on(j, Happened::Message(m, arrived))
            }
            Ok(crate::frames::Step::Close(code)) => {
                on(j, Happened::Closed(code));
                break true;
            }
            Ok(crate::frames::Step::NeedMore) => break false,
            Err(e) => {
                on(j, Happened::Failed(e.0));
                break true;
            }
        };
        match next {
            Next::Continue => {}
            Next::Reply(bytes) => {
                if let Err(e) = (&c.stream).write_all(&bytes) {
                    on(j, Happened::Failed(format!("write failed: {e}")));
                    break true;
                }
            }
            Next::Done => break true,
        }
    };
    let owed = c.frames.take_out();
    let failed_write = !done && !owed.is_empty() && (&c.stream).write_all(&owed).is_err();
    if done || failed_write {
        if failed_write {
            on(j, Happened::Failed("write failed".into()));
        }
        // Ends the multishot receive (it completes with an empty read, ignored from here on).
        let _ = c.stream.shutdown(std::net::Shutdown::Both);
        *conn = None;
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The ring's requests point at the entries and buffers: unregister (and let the ring's
        // own drop close it) before the memory goes.
        let _ = self.ring.submitter().unregister_buf_ring(GROUP);
        // SAFETY: allocated in `new` with this layout; the kernel no longer refers to it.
        unsafe { std::alloc::dealloc(self.entries as *mut u8, self.entries_layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::io::Read;
    use std::net::{Ipv4Addr, TcpListener};
    use std::sync::atomic::AtomicU64;

    use crate::frames::{server_frame, Deflate};

    /// `n` generator sockets (as `tcp_connect` makes them, receive timestamps on), each ready
    /// for the loop, and the server end of each.
    async fn connected(n: usize) -> (Vec<Conn>, Vec<std::net::TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut conns = Vec::new();
        let mut servers = Vec::new();
        for j in 0..n {
            let client = crate::client::tcp_connect(Ipv4Addr::LOCALHOST, addr)
                .await
                .expect("connect");
            let (server, _) = listener.accept().expect("accept");
            conns.push(Conn {
                j,
                stream: client.into_std().expect("std"),
                frames: Frames::new(Vec::new(), 0, 0, Deflate::Off),
            });
            servers.push(server);
        }
        (conns, servers)
    }

    /// Where the kernel has no io_uring at all (ENOSYS) or forbids it (EPERM, the
    /// `io_uring_disabled` sysctl) there is nothing to test: the worker falls back to epoll.
    fn ring_or_skip(sockets: usize, buffers: u16) -> Option<Ring> {
        match Ring::with_buffers(sockets, buffers) {
            Ok(ring) => Some(ring),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
                eprintln!("skipped: io_uring unavailable here ({e})");
                None
            }
            Err(e) => panic!("io_uring setup: {e}"),
        }
    }

    #[tokio::test]
    async fn receives_messages_stamps_pongs_and_ends_on_every_socket() {
        let Some(ring) = ring_or_skip(2, BUFFERS) else {
            return;
        };
        let big = "y".repeat(3 * BUFFER_SIZE);
        let (conns, mut servers) = connected(2).await;
        let before_late = std::sync::Arc::new(AtomicU64::new(0));
        let mut s1 = servers.pop().expect("two");
        let mut s0 = servers.pop().expect("two");
        let big_for_server = big.clone();
        let stamp_floor = std::sync::Arc::clone(&before_late);
        let server = std::thread::spawn(move || {
            // Before the loop starts: already buffered when the receives are armed.
            let mut early = server_frame(0x81, b"hello");
            early.extend(server_frame(0x89, b"p1"));
            early.extend(server_frame(0x01, b"ab"));
            early.extend(server_frame(0x80, b"cd"));
            s0.write_all(&early).expect("write");
            s1.write_all(&server_frame(0x81, big_for_server.as_bytes()))
                .expect("write");
            std::thread::sleep(Duration::from_millis(200));
            // After: arrives while the loop waits.
            stamp_floor.store(
                crate::publish::now_ns(),
                std::sync::atomic::Ordering::SeqCst,
            );
            s0.write_all(&server_frame(0x81, b"late")).expect("write");
            std::thread::sleep(Duration::from_millis(50));
            s0.write_all(&server_frame(0x88, &1000u16.to_be_bytes()))
                .expect("write");
            drop(s1);
            let mut pong = [0u8; 8];
            s0.read_exact(&mut pong).expect("pong");
            pong
        });
        let got: RefCell<Vec<(usize, String, Option<u64>)>> = RefCell::new(Vec::new());
        let ended = std::cell::Cell::new(0);
        let deadline = Instant::now() + Duration::from_secs(10);
        let inflater = RefCell::new(flate2::Decompress::new(false));
        ring.run(
            conns,
            &inflater,
            |j, happened| {
                let (what, stamp) = match happened {
                    Happened::Message(m, stamp) => (String::from_utf8_lossy(m).into_owned(), stamp),
                    Happened::Closed(code) => {
                        ended.set(ended.get() + 1);
                        (format!("closed {code:?}"), None)
                    }
                    Happened::Failed(e) => panic!("connection {j}: {e}"),
                };
                got.borrow_mut().push((j, what, stamp));
                Next::Continue
            },
            || ended.get() < 2 && Instant::now() < deadline,
            Duration::from_millis(10),
        )
        .expect("runs");
        let got = got.into_inner();
        let of = |j: usize| -> Vec<String> {
            got.iter()
                .filter(|g| g.0 == j)
                .map(|g| g.1.clone())
                .collect()
        };
        assert_eq!(of(0), ["hello", "abcd", "late", "closed Some(1000)"]);
        assert_eq!(of(1), [big.clone(), "closed None".to_string()]);
        // The message that arrived while the loop waited carries its arrival time.
        let late = got.iter().find(|g| g.1 == "late").expect("late");
        let floor = before_late.load(std::sync::atomic::Ordering::SeqCst);
        let stamp = late.2.expect("SO_TIMESTAMPNS came through the ring");
        assert!(stamp >= floor, "{stamp} < {floor}");
        // The ping was answered with a masked pong.
        let pong = server.join().expect("server");
        assert_eq!(&pong[..2], &[0x8A, 0x80 | 2]);
        let unmasked: Vec<u8> = pong[6..8]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ pong[2 + i])
            .collect();
        assert_eq!(unmasked, b"p1");
    }

    #[tokio::test]
    async fn sockets_that_find_no_free_buffer_are_armed_again() {
        // Two buffers for sixteen sockets that all have data at once: most receives end with
        // ENOBUFS and every message still arrives once its socket is armed again.
        let Some(ring) = ring_or_skip(16, 2) else {
            return;
        };
        let (conns, mut servers) = connected(16).await;
        let writer = std::thread::spawn(move || {
            for round in 0..20 {
                for (j, s) in servers.iter_mut().enumerate() {
                    let text = format!("{j}:{round}");
                    s.write_all(&server_frame(0x81, text.as_bytes()))
                        .expect("write");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            servers
        });
        let got = RefCell::new(vec![Vec::new(); 16]);
        let deadline = Instant::now() + Duration::from_secs(10);
        let inflater = RefCell::new(flate2::Decompress::new(false));
        ring.run(
            conns,
            &inflater,
            |j, happened| {
                match happened {
                    Happened::Message(m, _) => {
                        got.borrow_mut()[j].push(String::from_utf8_lossy(m).into_owned())
                    }
                    Happened::Closed(code) => panic!("connection {j} closed: {code:?}"),
                    Happened::Failed(e) => panic!("connection {j}: {e}"),
                }
                Next::Continue
            },
            || {
                got.borrow().iter().map(Vec::len).sum::<usize>() < 16 * 20
                    && Instant::now() < deadline
            },
            Duration::from_millis(5),
        )
        .expect("runs");
        let _servers = writer.join().expect("writer");
        for (j, messages) in got.into_inner().into_iter().enumerate() {
            let want: Vec<String> = (0..20).map(|round| format!("{j}:{round}")).collect();
            assert_eq!(messages, want, "connection {j}");
        }
    }
}
