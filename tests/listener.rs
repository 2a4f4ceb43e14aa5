//! One gateway per address, and a restart after a crash that resets no
//! client: real `ruyi serve` processes, started, refused and killed with
//! SIGKILL.

mod common;

use common::{token, API_TOKEN, SECRET};
use ruyi::client::{connect, ConnectOptions};
use std::io::BufRead;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Connections made one after another right after the restart.
const CONNECTIONS_AFTER_RESTART: usize = 200;

/// How long the tests keep a killed gateway's listening sockets alive: far
/// longer than the kernel does by itself (tens of milliseconds on an idle
/// machine, more under load), so that the restart surely overlaps them.
const LINGER: Duration = Duration::from_millis(500);

/// Starts `ruyi serve` on `listen` with its admin API on `http`, in `dir`,
/// with stdout and stderr captured, and `extra` arguments.
fn serve(dir: &Path, listen: &str, http: &str, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ruyi"))
        .args(["serve", "--listen", listen, "--shards", "2", "--http", http])
        .args(extra)
        .arg("--data-dir")
        .arg(dir)
        .env("RUYI_AUTH_SECRET", SECRET)
        .env("RUYI_API_TOKEN", API_TOKEN)
        .env("RUYI_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ruyi serve starts")
}

/// Waits for a gateway that is expected to refuse to start. One that keeps
/// running instead is killed and the test fails.
fn refused(mut child: Child) -> (Output, String) {
    let deadline = Instant::now() + common::WAIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let output = child.wait_with_output().unwrap();
            panic!(
                "the second gateway started; it printed {:?}",
                String::from_utf8_lossy(&output.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output, stderr)
}

/// Kills a gateway and returns what it logged.
fn stop(mut child: Child) -> String {
    child.kill().unwrap();
    let output = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A real handshake: connected, authenticated, ConnAck received.
async fn conn_ack(addr: SocketAddr, uid: &str) -> Result<(), ruyi::client::ClientError> {
    let options = ConnectOptions::new(uid).token(&token(uid)).resume(false);
    let (client, _incoming) = connect(addr, options).await?;
    client.close().await;
    Ok(())
}

/// A configuration file in `dir` with `settings` added, and without the
/// per-address accept limit, so that every one of many connections in a
/// row from this test is admitted and only the listener is tested.
fn config_file(dir: &Path, settings: &str) -> String {
    let path = dir.join("ruyi.toml");
    std::fs::write(
        &path,
        format!("{settings}\n[limits]\naccepts_per_ip_per_second = 0\n"),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_on_a_held_client_address_exits_non_zero_naming_the_address_and_the_process(
) {
    let first_dir = tempfile::tempdir().unwrap();
    let (first, addr) = common::spawn_gateway(first_dir.path());
    let second_dir = tempfile::tempdir().unwrap();
    let second = serve(second_dir.path(), &addr.to_string(), "127.0.0.1:0", &[]);
    let (output, stderr) = refused(second);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!("cannot listen on {addr} (client listener)")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("process {} (ruyi)", first.id())),
        "{stderr}"
    );
    // The first gateway keeps serving every client.
    for i in 0..20 {
        conn_ack(addr, &format!("user{i}")).await.unwrap();
    }
    stop(first);
}

#[test]
fn a_second_gateway_on_a_held_admin_api_address_exits_non_zero_naming_the_address_and_the_process()
{
    let first_dir = tempfile::tempdir().unwrap();
    let (first, _, api) = common::spawn_gateway_with(first_dir.path(), "127.0.0.1:0", &[]);
    let second_dir = tempfile::tempdir().unwrap();
    let second = serve(second_dir.path(), "127.0.0.1:0", &api.to_string(), &[]);
    let (output, stderr) = refused(second);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!("cannot listen on {api} (admin API)")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("process {} (ruyi)", first.id())),
        "{stderr}"
    );
    stop(first);
}

#[test]
fn an_address_another_program_listens_on_is_refused_naming_that_program() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (output, stderr) = refused(serve(dir.path(), &addr.to_string(), "127.0.0.1:0", &[]));
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("process {} (", std::process::id())),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_kill_9_and_an_immediate_restart_every_connection_gets_its_conn_ack() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), "");
    let data = dir.path().join("data");
    let (mut crashed, addr, _) =
        common::spawn_gateway_with(&data, "127.0.0.1:0", &["--config", &config]);
    conn_ack(addr, "before").await.unwrap();
    let lingering = linger_listening_sockets(crashed.id(), addr.port());
    crashed.kill().unwrap();
    crashed.wait().unwrap();
    // The kernel closes the dead process's sockets a moment later; here,
    // after LINGER.
    let released = std::thread::spawn(move || {
        std::thread::sleep(LINGER);
        drop(lingering);
    });

    let mut restarted = serve(
        &data,
        &addr.to_string(),
        "127.0.0.1:0",
        &["--config", &config],
    );
    let mut line = String::new();
    std::io::BufReader::new(restarted.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("ruyi listening on"), "{line:?}");
    let mut failures = Vec::new();
    for i in 0..CONNECTIONS_AFTER_RESTART {
        if let Err(error) = conn_ack(addr, &format!("user{i}")).await {
            failures.push(format!("connection {i}: {error}"));
        }
    }
    released.join().unwrap();
    let log = stop(restarted);
    assert!(
        failures.is_empty(),
        "{} of {CONNECTIONS_AFTER_RESTART} connections failed: {failures:?}",
        failures.len()
    );
    assert!(
        log.contains("a listening socket of an exited process"),
        "the wait is logged: {log}"
    );
}

#[test]
fn a_start_gives_up_when_a_dead_process_socket_outlasts_listener_release_wait_ms() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), "[server]\nlistener_release_wait_ms = 200");
    let data = dir.path().join("data");
    let (mut crashed, addr, _) =
        common::spawn_gateway_with(&data, "127.0.0.1:0", &["--config", &config]);
    let lingering = linger_listening_sockets(crashed.id(), addr.port());
    crashed.kill().unwrap();
    crashed.wait().unwrap();
    let (output, stderr) = refused(serve(
        &data,
        &addr.to_string(),
        "127.0.0.1:0",
        &["--config", &config],
    ));
    drop(lingering);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!("cannot listen on {addr} (client listener)")),
        "{stderr}"
    );
    assert!(
        stderr.contains("server.listener_release_wait_ms"),
        "{stderr}"
    );
}

/// The listening sockets of a gateway, kept alive after it dies.
struct Lingering {
    _parked: (UnixStream, UnixStream),
}

/// Keeps the listening sockets of gateway `pid` on `port` open after the
/// gateway is killed, the way the kernel does for a moment after a kill -9
/// (an accept still in flight in the dead process's io_uring holds each
/// one), but until the returned value is dropped: each socket is copied out
/// of the gateway (`pidfd_getfd`) and parked in a Unix socket's queue
/// (`SCM_RIGHTS`), where no process holds it. So the restart overlaps them
/// every time, not only when the machine is slow.
fn linger_listening_sockets(pid: u32, port: u16) -> Lingering {
    let inodes = listening_inodes(port);
    assert!(!inodes.is_empty(), "nothing listens on port {port}");
    let mut fds = Vec::new();
    for inode in inodes {
        let wanted = format!("socket:[{inode}]");
        let fd = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .find(|entry| {
                std::fs::read_link(entry.path()).is_ok_and(|link| link.as_os_str() == &*wanted)
            })
            .and_then(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
            .unwrap_or_else(|| panic!("process {pid} does not hold {wanted}"));
        fds.push(copy_fd(pid, fd));
    }
    let parked = UnixStream::pair().unwrap();
    send_fds(&parked.0, &fds);
    Lingering { _parked: parked }
}

/// Inodes of the sockets listening on `port`, from /proc/net/tcp{,6}.
fn listening_inodes(port: u16) -> Vec<u64> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table).unwrap().lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields[1].rsplit(':').next().unwrap();
            if fields[3] == "0A" && u16::from_str_radix(local_port, 16).unwrap() == port {
                let inode = fields[9].parse().unwrap();
                if !inodes.contains(&inode) {
                    inodes.push(inode);
                }
            }
        }
    }
    inodes
}

/// A copy, in this process, of descriptor `fd` of process `pid`.
fn copy_fd(pid: u32, fd: i32) -> OwnedFd {
    // SAFETY: plain system calls; each result is checked before use, and
    // each new descriptor is owned exactly once.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0);
        assert!(
            pidfd >= 0,
            "pidfd_open: {}",
            std::io::Error::last_os_error()
        );
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let copy = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        assert!(
            copy >= 0,
            "pidfd_getfd: {}",
            std::io::Error::last_os_error()
        );
        OwnedFd::from_raw_fd(copy as i32)
    }
}

/// Sends `fds` over `socket` with one byte of data; the caller then closes
/// its own copies.
fn send_fds(socket: &UnixStream, fds: &[OwnedFd]) {
    let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let data_len = std::mem::size_of_val(raw.as_slice());
    // SAFETY: the control buffer is sized with CMSG_SPACE for the
    // descriptors and aligned for cmsghdr; the header is filled through the
    // CMSG macros inside it, and the iovec points at a live byte.
    unsafe {
        let space = libc::CMSG_SPACE(data_len as u32) as usize;
        let mut control = vec![0u64; space.div_ceil(8)];
        let mut byte = 0u8;
        let mut iov = libc::iovec {
            iov_base: (&mut byte as *mut u8).cast(),
            iov_len: 1,
        };
        let mut message: libc::msghdr = std::mem::zeroed();
        message.msg_iov = &mut iov;
        message.msg_iovlen = 1;
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = space as _;
        let header = libc::CMSG_FIRSTHDR(&message);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(data_len as u32) as _;
        std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(header).cast(), raw.len());
        let sent = libc::sendmsg(socket.as_raw_fd(), &message, 0);
        assert_eq!(sent, 1, "sendmsg: {}", std::io::Error::last_os_error());
    }
}
