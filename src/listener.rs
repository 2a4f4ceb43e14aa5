//! The gateway's listening sockets: one socket per address, shared by every
//! shard, and the refusal to start when another process listens there.
//!
//! Every address the gateway listens on (the client listener, the admin
//! API, and any listener added later, such as WebSocket, each with its own
//! [`Role`]) gets exactly one socket from [`bind`], bound without
//! `SO_REUSEPORT`. That is what makes the kernel refuse a second gateway on
//! the same address: with `SO_REUSEPORT` a second process of the same user
//! would join the first one's group and the kernel would split new clients
//! between two independent gateways. The shards share the client socket
//! instead (each holds a duplicate of its descriptor, see [`share`], and
//! keeps its own accept in flight on it), so every connection the kernel
//! queues is on a socket that this process serves.
//!
//! When the bind finds the address taken, [`bind`] looks for the holder:
//! the listening socket's inode in `/proc/net/tcp` and `/proc/net/tcp6`,
//! then the process that has that inode open in `/proc/*/fd`. A running
//! process is refused at once, by pid and name. A listening socket that no
//! process has open is what a process killed with SIGKILL leaves behind:
//! the accept it had in flight in its io_uring keeps the socket listening
//! (and queueing connections that will be reset) until the kernel tears the
//! ring down a moment later. [`bind`] waits for that, bounded by
//! `server.listener_release_wait_ms` and logged, and then binds, so a
//! restarted gateway serves every connection from the first one it
//! accepts.

use socket2::{Domain, Protocol, Socket, Type};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

/// What a listening socket is for, as named in logs and errors. A new
/// listener (WebSocket, say) adds a role here and binds through [`bind`],
/// and gets the same refusal and the same wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The binary protocol listener (`server.listen`).
    Client,
    /// The admin HTTP API (`api.listen`).
    AdminApi,
    /// The WebSocket listener (`ws.listen`).
    WebSocket,
    /// WuKongIM's protocol over TCP (`wkproto.listen`).
    Wkproto,
    /// WuKongIM's protocol over WebSocket (`wkproto.ws_listen`).
    WkprotoWebSocket,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Client => "client listener",
            Role::AdminApi => "admin API",
            Role::WebSocket => "WebSocket listener",
            Role::Wkproto => "WKProto listener",
            Role::WkprotoWebSocket => "WKProto WebSocket listener",
        })
    }
}

/// Who holds an address that [`bind`] found taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// A running process has a listening socket on the address open.
    Process { pid: u32, name: String },
    /// A listening socket owned by another user, whose processes this one
    /// may not inspect.
    OtherUser { uid: u32 },
    /// A listening socket that no process has open, or only one that is
    /// exiting: left by a process that was killed, and about to be closed
    /// by the kernel.
    Exited,
    /// No socket listens on the address; the port is held by one that does
    /// not listen (an outgoing connection, or a socket only bound).
    NotListening,
    /// `/proc` could not be read, so the holder is not known.
    Unknown { detail: String },
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Process { pid, name } => write!(
                f,
                "process {pid} ({name}) already listens there; stop it or choose another address"
            ),
            Holder::OtherUser { uid } => write!(
                f,
                "a process of uid {uid} already listens there (this user cannot see which)"
            ),
            Holder::Exited => f.write_str("a listening socket of an exited process holds it"),
            Holder::NotListening => f.write_str(
                "the port is in use by a socket that does not listen (an outgoing connection?)",
            ),
            Holder::Unknown { detail } => {
                write!(
                    f,
                    "the address is in use (who holds it is unknown: {detail})"
                )
            }
        }
    }
}

/// Why a listening socket could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr} ({role}): {holder}")]
    Taken {
        role: Role,
        addr: SocketAddr,
        holder: Holder,
    },
    #[error(
        "cannot listen on {addr} ({role}): a listening socket of an exited process still \
         holds it after {waited_ms} ms (server.listener_release_wait_ms)"
    )]
    StillReleasing {
        role: Role,
        addr: SocketAddr,
        waited_ms: u64,
    },
    #[error("cannot listen on {addr} ({role}): {source}")]
    Io {
        role: Role,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// How often [`bind`] tries again while a dead process's socket is being
/// closed. Short, because the wait delays the whole start; a bind attempt
/// and a read of `/proc/net/tcp` are cheap.
const RELEASE_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Binds and listens on `addr` with one non-blocking socket, refusing an
/// address that another process listens on (naming it when `/proc` tells),
/// and waiting up to `release_wait` for the listening sockets of a process
/// that exited to close. Returns the socket and its address (with the real
/// port when `addr` asked for port 0).
pub fn bind(
    role: Role,
    addr: SocketAddr,
    backlog: u32,
    release_wait: Duration,
) -> Result<(Socket, SocketAddr), ListenError> {
    let started = Instant::now();
    let mut waiting = false;
    let mut looked_again = false;
    loop {
        let error = match bind_once(addr, backlog) {
            Ok(bound) => {
                if waiting {
                    tracing::info!(%addr, %role, waited_ms = started.elapsed().as_millis() as u64,
                        "the exited process's listening socket is closed; listening");
                }
                return Ok(bound);
            }
            Err(error) => error,
        };
        if error.kind() != std::io::ErrorKind::AddrInUse {
            return Err(ListenError::Io {
                role,
                addr,
                source: error,
            });
        }
        match holder_of(addr) {
            Holder::Exited => {}
            // The listening socket that failed the bind may have closed
            // before the look at /proc: bind again before blaming a socket
            // that does not listen.
            Holder::NotListening if !looked_again => {
                looked_again = true;
                continue;
            }
            holder => return Err(ListenError::Taken { role, addr, holder }),
        }
        let waited = started.elapsed();
        if waited >= release_wait {
            return Err(ListenError::StillReleasing {
                role,
                addr,
                waited_ms: waited.as_millis() as u64,
            });
        }
        if !waiting {
            tracing::warn!(%addr, %role, wait_max_ms = release_wait.as_millis() as u64,
                "a listening socket of an exited process (killed?) holds the address; \
                 waiting for the kernel to close it");
            waiting = true;
        }
        std::thread::sleep(RELEASE_POLL_INTERVAL);
    }
}

fn bind_once(addr: SocketAddr, backlog: u32) -> std::io::Result<(Socket, SocketAddr)> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // SO_REUSEADDR only lets the bind pass over connections of an earlier
    // run that linger in TIME_WAIT; it never lets two sockets listen on one
    // address. No SO_REUSEPORT: see the module documentation.
    socket.set_reuse_address(true)?;
    // Non-blocking from the start and for good: the shards' duplicates share
    // this one open file description, and glommio's accept switches
    // O_NONBLOCK on and back around its first try. If the flag could be off,
    // one shard switching it back could leave another shard blocked in
    // accept(2) on its executor thread.
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    let local = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("the listening socket has no IP address"))?;
    Ok((socket, local))
}

/// One descriptor of `socket` per shard: the socket itself and duplicates
/// of it. They all refer to one listening socket with one accept queue,
/// which every shard takes connections from.
pub fn share(socket: Socket, shards: u16) -> std::io::Result<Vec<OwnedFd>> {
    let mut fds = Vec::with_capacity(usize::from(shards));
    for _ in 1..shards {
        fds.push(OwnedFd::from(socket.try_clone()?));
    }
    fds.push(OwnedFd::from(socket));
    Ok(fds)
}

/// Who holds `addr`, from `/proc`: the first process found with one of the
/// listening sockets on it open.
pub fn holder_of(addr: SocketAddr) -> Holder {
    let mut sockets = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        match std::fs::read_to_string(table) {
            Ok(text) => sockets.extend(
                text.lines()
                    .skip(1)
                    .filter_map(parse_socket_line)
                    .filter(|s| s.listening && overlaps(s.local, addr)),
            ),
            // A kernel without IPv6 has no tcp6 table.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Holder::Unknown {
                    detail: format!("reading {table}: {error}"),
                }
            }
        }
    }
    if sockets.is_empty() {
        return Holder::NotListening;
    }
    let inodes: Vec<u64> = sockets.iter().map(|s| s.inode).collect();
    let search = match find_process(&inodes) {
        Ok(search) => search,
        Err(error) => {
            return Holder::Unknown {
                detail: format!("reading /proc: {error}"),
            }
        }
    };
    if let Some(pid) = search.owner {
        // A process killed a moment ago may still be on its way out, with
        // its descriptors not yet closed: that is a dead process's socket.
        if process_is_exiting(pid) {
            return Holder::Exited;
        }
        return Holder::Process {
            pid,
            name: process_name(pid),
        };
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own_uid = unsafe { libc::geteuid() };
    match sockets.iter().find(|s| s.uid != own_uid) {
        // Another user's socket, and some processes could not be looked
        // into: it may well be held by one of them.
        Some(theirs) if search.unreadable_processes > 0 => Holder::OtherUser { uid: theirs.uid },
        _ => Holder::Exited,
    }
}

/// One socket of `/proc/net/tcp` or `/proc/net/tcp6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcSocket {
    local: SocketAddr,
    listening: bool,
    uid: u32,
    inode: u64,
}

/// Parses one line of the table, for example
/// `0: 0100007F:13AD 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000  0 12345 1 ...`:
/// addresses are hexadecimal 32-bit words in the kernel's byte order, the
/// port is a hexadecimal number, state `0A` is LISTEN.
fn parse_socket_line(line: &str) -> Option<ProcSocket> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (ip, port) = fields.get(1)?.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(ip, 16).ok()?.to_ne_bytes(),
        )),
        32 => {
            let mut bytes = [0u8; 16];
            for (word, out) in bytes.chunks_exact_mut(4).enumerate() {
                let hex = ip.get(word * 8..word * 8 + 8)?;
                out.copy_from_slice(&u32::from_str_radix(hex, 16).ok()?.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(ProcSocket {
        local: SocketAddr::new(ip, port),
        listening: *fields.get(3)? == "0A",
        uid: fields.get(7)?.parse().ok()?,
        inode: fields.get(9)?.parse().ok()?,
    })
}

/// Whether a socket bound to `bound` keeps a bind to `wanted` from
/// succeeding: the same port, and the same address or either one the
/// wildcard. IPv4-mapped IPv6 addresses count as IPv4, and a wildcard of
/// either family counts for both (a dual-stack `[::]` takes IPv4 too).
pub(crate) fn overlaps(bound: SocketAddr, wanted: SocketAddr) -> bool {
    let plain = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let (a, b) = (plain(bound.ip()), plain(wanted.ip()));
    bound.port() == wanted.port() && (a == b || a.is_unspecified() || b.is_unspecified())
}

/// What a search of `/proc/*/fd` found.
struct ProcessSearch {
    owner: Option<u32>,
    /// Processes whose descriptors this user may not read.
    unreadable_processes: usize,
}

/// The first process that has one of the socket `inodes` open.
fn find_process(inodes: &[u64]) -> std::io::Result<ProcessSearch> {
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    let mut unreadable_processes = 0;
    for entry in std::fs::read_dir("/proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let fds = match std::fs::read_dir(format!("/proc/{pid}/fd")) {
            Ok(fds) => fds,
            Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
                unreadable_processes += 1;
                continue;
            }
            // The process exited meanwhile.
            Err(_) => continue,
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if wanted.iter().any(|w| target.as_os_str() == w.as_str()) {
                    return Ok(ProcessSearch {
                        owner: Some(pid),
                        unreadable_processes,
                    });
                }
            }
        }
    }
    Ok(ProcessSearch {
        owner: None,
        unreadable_processes,
    })
}

/// Whether the kernel has begun ending the process (`PF_EXITING` in the
/// flags of `/proc/PID/stat`), after SIGKILL for example.
fn process_is_exiting(pid: u32) -> bool {
    const PF_EXITING: u64 = 0x4;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        // Gone already.
        return true;
    };
    // The name, in parentheses, may hold spaces and parentheses itself: the
    // fields are counted from the last `)`. After it come the state, the
    // parent, the process group, the session, the terminal, its process
    // group, and then the flags.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(6))
        .and_then(|flags| flags.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_EXITING != 0)
}

fn process_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|name| name.trim_end().to_owned())
        .unwrap_or_else(|_| "name unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_lines_parse_to_address_state_uid_and_inode() {
        let v4 = "   0: 0100007F:13AD 00000000:0000 0A 00000000:00000000 00:00000000 00000000  \
                  1000        0 12345 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_socket_line(v4),
            Some(ProcSocket {
                local: "127.0.0.1:5037".parse().unwrap(),
                listening: true,
                uid: 1000,
                inode: 12345,
            })
        );
        let v6 =
            "   1: 00000000000000000000000001000000:13AD 00000000000000000000000000000000:0000 \
                  01 00000000:00000000 00:00000000 00000000     0        0 777 1 0 20 4 1 151 -1";
        let parsed = parse_socket_line(v6).unwrap();
        assert_eq!(parsed.local, "[::1]:5037".parse().unwrap());
        assert!(!parsed.listening);
        assert_eq!((parsed.uid, parsed.inode), (0, 777));
        let header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when";
        assert_eq!(parse_socket_line(header), None);
    }

    #[test]
    fn overlapping_addresses_are_the_same_port_and_the_same_or_a_wildcard_address() {
        let overlap = |a: &str, b: &str| overlaps(a.parse().unwrap(), b.parse().unwrap());
        assert!(overlap("127.0.0.1:80", "127.0.0.1:80"));
        assert!(overlap("0.0.0.0:80", "127.0.0.1:80"));
        assert!(overlap("127.0.0.1:80", "0.0.0.0:80"));
        assert!(overlap("[::]:80", "127.0.0.1:80"));
        assert!(overlap("[::ffff:127.0.0.1]:80", "127.0.0.1:80"));
        assert!(!overlap("127.0.0.1:80", "127.0.0.1:81"));
        assert!(!overlap("127.0.0.2:80", "127.0.0.1:80"));
    }

    #[test]
    fn an_address_this_process_listens_on_is_refused_naming_this_process() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let error = bind(Role::Client, addr, 16, Duration::from_secs(5)).unwrap_err();
        match &error {
            ListenError::Taken { holder, .. } => assert_eq!(
                holder,
                &Holder::Process {
                    pid: std::process::id(),
                    name: process_name(std::process::id()),
                }
            ),
            other => panic!("expected Taken, got {other:?}"),
        }
        let message = error.to_string();
        assert!(message.contains(&addr.to_string()), "{message}");
        assert!(message.contains("client listener"), "{message}");
    }

    #[test]
    fn shared_descriptors_are_one_non_blocking_listening_socket() {
        let (socket, addr) = bind(
            Role::Client,
            "127.0.0.1:0".parse().unwrap(),
            16,
            Duration::ZERO,
        )
        .unwrap();
        let fds = share(socket, 3).unwrap();
        assert_eq!(fds.len(), 3);
        for fd in fds {
            let socket = Socket::from(fd);
            assert_eq!(socket.local_addr().unwrap().as_socket(), Some(addr));
            assert!(socket.nonblocking().unwrap());
        }
    }
}
