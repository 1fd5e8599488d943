//! Reading the answers of third parties the services call (push providers, SMS providers),
//! bounded: their endpoints are configured per app, some (a Web Push endpoint) are whatever URL
//! an app registered, and an answer read whole could hold any amount in memory.

/// Reads at most `max` bytes of `resp`'s body. A longer body is cut there and the rest is not
/// read (the connection is closed when the response is dropped, not reused); a body that fails
/// midway counts as what arrived, since the status code already decided the outcome.
pub async fn read_bounded(resp: &mut reqwest::Response, max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < max {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                let room = max - out.len();
                out.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endpoint that announces a 1 GiB answer and writes it as fast as it is read: the
    /// answer is cut at the limit, and once the response is dropped the endpoint's writes
    /// fail, having sent only the limit plus what the sockets buffer, not the gigabyte.
    #[tokio::test]
    async fn a_huge_answer_is_cut_at_the_limit_and_not_read_on(
    ) -> Result<(), Box<dyn std::error::Error>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        const ANNOUNCED: u64 = 1 << 30;
        const MAX: usize = 64 * 1024;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await?;
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = sock.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<u64, std::io::Error>(0);
                }
                head.extend_from_slice(&buf[..n]);
            }
            sock.write_all(
                format!("HTTP/1.1 200 OK\r\ncontent-length: {ANNOUNCED}\r\n\r\n").as_bytes(),
            )
            .await?;
            let chunk = vec![b'x'; 64 * 1024];
            let mut sent = 0u64;
            while sent < ANNOUNCED {
                if sock.write_all(&chunk).await.is_err() {
                    break;
                }
                sent += chunk.len() as u64;
            }
            Ok(sent)
        });
        crate::tls::install_crypto_provider();
        let mut resp = reqwest::Client::new()
            .post(format!("http://{addr}/push"))
            .body("{}")
            .send()
            .await?;
        let answer = read_bounded(&mut resp, MAX).await;
        drop(resp);
        assert_eq!(answer.len(), MAX);
        let sent = server.await??;
        assert!(sent < 64 * 1024 * 1024, "the endpoint sent {sent} bytes");
        Ok(())
    }
}
