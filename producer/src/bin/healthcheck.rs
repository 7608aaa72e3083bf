//! `spillway-healthcheck VAR DEFAULT`: the images' HEALTHCHECK, so that they need no shell and
//! no curl. It reads the service's listen address from the environment variable VAR (the one
//! the service reads: `SPILLWAY_LISTEN` for the producer, `SPILLWAY_METRICS_LISTEN` for the
//! consumer), else DEFAULT, asks that port on the loopback for `GET /healthz`, and exits 0 on a
//! 200, 1 on anything else within 3 s.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    match check() {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("spillway-healthcheck: {why}");
            ExitCode::FAILURE
        }
    }
}

fn check() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let (Some(var), Some(default)) = (args.next(), args.next()) else {
        return Err("usage: spillway-healthcheck ENV_VARIABLE DEFAULT_ADDRESS".into());
    };
    let listen = std::env::var(&var).unwrap_or(default);
    let mut addr: SocketAddr = listen.parse().map_err(|e| format!("{var}={listen}: {e}"))?;
    // A service listening on every address answers on the loopback too.
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => addr.set_ip(Ipv4Addr::LOCALHOST.into()),
        IpAddr::V6(ip) if ip.is_unspecified() => addr.set_ip(Ipv6Addr::LOCALHOST.into()),
        _ => {}
    }
    let timeout = Duration::from_secs(3);
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .and_then(|()| {
            stream.write_all(
                format!("GET /healthz HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
        })
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut answer = Vec::new();
    let _ = stream.take(4096).read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.lines().next().unwrap_or("no answer");
    match status.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        _ => Err(format!("http://{addr}/healthz: {status}")),
    }
}
