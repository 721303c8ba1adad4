//! Clients that ask a server who answered: the one TCP and UDP client of the traffic tests.
//! Each test's servers answer in their own words (a name, a name and the peer they saw, an
//! echo); these functions carry the bytes and leave the words to the caller.
//!
//! Include with `#[path = "support/traffic.rs"] mod traffic;`.

#![allow(dead_code)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::time::Duration;

/// How long a client waits for a connection or an answer unless it says otherwise.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Connects to `address` and returns the server's greeting line, trimmed.
pub fn tcp_ask(address: SocketAddr) -> std::io::Result<String> {
    Ok(TcpSession::connect(address)?.greeting)
}

/// Sends one datagram `b"?"` from a fresh source port (a new IPVS connection each time) and
/// returns the answer.
pub fn udp_ask(address: SocketAddr) -> std::io::Result<String> {
    udp_exchange(address, b"?", ANSWER_TIMEOUT).map(|(answer, _)| answer)
}

/// Sends `payload` from a fresh unconnected socket of `target`'s family and returns the
/// answer and the address it came from (a datagram's reply may come from elsewhere).
pub fn udp_exchange(
    target: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> std::io::Result<(String, SocketAddr)> {
    let socket = match target {
        SocketAddr::V4(_) => UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?,
        SocketAddr::V6(_) => UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?,
    };
    socket.set_read_timeout(Some(timeout))?;
    socket.send_to(payload, target)?;
    let mut buf = [0u8; 512];
    let (n, from) = socket.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

/// [`udp_exchange`] from a connected socket: an ICMP port unreachable comes back as
/// `ConnectionRefused` (an unconnected socket sees only the timeout).
pub fn udp_exchange_connected(
    target: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> std::io::Result<String> {
    let socket = match target {
        SocketAddr::V4(_) => UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?,
        SocketAddr::V6(_) => UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?,
    };
    socket.set_read_timeout(Some(timeout))?;
    socket.connect(target)?;
    socket.send(payload)?;
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Connects within `timeout` and returns all the server sent until it closed (a server that
/// answers each connection once).
pub fn tcp_read_to_close(target: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&target, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut stream, &mut text)?;
    Ok(text)
}

/// A TCP connection to a server that greets with one line and then answers line by line.
pub struct TcpSession {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    /// The greeting, trimmed: which backend accepted the connection.
    pub greeting: String,
}

impl TcpSession {
    /// Connects and reads the greeting, waiting [`ANSWER_TIMEOUT`] for either.
    pub fn connect(address: SocketAddr) -> std::io::Result<Self> {
        Self::connect_within(address, ANSWER_TIMEOUT, ANSWER_TIMEOUT)
    }

    /// Connects within `connect_timeout` (a dropped SYN fails after it) and reads the
    /// greeting, then every answer, within `answer_timeout`.
    pub fn connect_within(
        address: SocketAddr,
        connect_timeout: Duration,
        answer_timeout: Duration,
    ) -> std::io::Result<Self> {
        let stream = TcpStream::connect_timeout(&address, connect_timeout)?;
        stream.set_read_timeout(Some(answer_timeout))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut greeting = String::new();
        reader.read_line(&mut greeting)?;
        if greeting.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before the greeting",
            ));
        }
        Ok(Self {
            stream,
            reader,
            greeting: greeting.trim().to_owned(),
        })
    }

    /// Sends `line` (a newline is added) and returns the answer line as received, newline
    /// included.
    pub fn exchange(&mut self, line: &str) -> std::io::Result<String> {
        writeln!(self.stream, "{line}")?;
        let mut answer = String::new();
        self.reader.read_line(&mut answer)?;
        if answer.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        Ok(answer)
    }

    /// Sends `ping` and returns the answer, trimmed.
    pub fn ask(&mut self) -> std::io::Result<String> {
        Ok(self.exchange("ping")?.trim().to_owned())
    }

    /// Closes with a reset (SO_LINGER 0), so IPVS drops the connection after its short CLOSE
    /// timeout instead of keeping it in TIME_WAIT for two minutes.
    pub fn reset(self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket fd and a correctly sized linger struct.
        unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
        drop(self.reader);
        drop(self.stream);
    }
}
