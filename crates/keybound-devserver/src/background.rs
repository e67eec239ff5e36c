//! A dev-server on its own thread and async runtime, for callers that are not async or that
//! must not share their runtime with it (tests that drive keybound's built binary).

use std::net::Ipv4Addr;
use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::{DevServer, DevServerError, Endpoints, Settings};

/// A running dev-server on 127.0.0.1. Dropping it stops it at once, like killing a
/// process: the runtime is dropped, which cancels every request in flight, and the thread
/// is joined.
pub struct Background {
    endpoints: Endpoints,
    requests: super::RequestLog,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    /// Binds 127.0.0.1:`port` (0 picks a free one), checks the settings and loads the
    /// client's JWKS as [`DevServer::new`] does, and serves on a new thread. Returns once the
    /// server accepts connections, or with the reason it could not start.
    pub fn start(port: u16, settings: Settings) -> Result<Background, DevServerError> {
        let requests = settings.requests.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        // The runtime is built, used and dropped on the new thread only: a caller inside an
        // async runtime of its own can neither block on nor drop another runtime.
        let thread = std::thread::Builder::new()
            .name("keybound-devserver".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(DevServerError::Runtime(e)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let server = match bind_and_load(port, settings).await {
                        Ok(server) => server,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(server.endpoints().clone()));
                    // Served on a task of its own, so that returning from here (the stop
                    // signal, or the handle gone) leaves it to be cancelled with the runtime.
                    let serving = tokio::spawn(server.serve(std::future::pending()));
                    tokio::select! {
                        _ = stopped => {}
                        ended = serving => {
                            if let Ok(Err(e)) = ended {
                                tracing::error!("the dev-server stopped: {e}");
                            }
                        }
                    }
                });
            })
            .map_err(DevServerError::Thread)?;
        match ready_rx.recv() {
            Ok(Ok(endpoints)) => Ok(Background {
                endpoints,
                requests,
                stop: Some(stop),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            // The thread ended without a word: it can only have panicked.
            Err(_) => {
                let _ = thread.join();
                Err(DevServerError::Thread(std::io::Error::other(
                    "the dev-server thread ended before it started serving",
                )))
            }
        }
    }

    /// The server's URLs.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// Every request the server was sent so far.
    pub fn requests(&self) -> Vec<super::SeenRequest> {
        self.requests.snapshot()
    }

    /// `http://127.0.0.1:PORT`: the issuer, and the base of every other URL.
    pub fn base(&self) -> &str {
        &self.endpoints.issuer
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn bind_and_load(port: u16, settings: Settings) -> Result<DevServer, DevServerError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .await
        .map_err(|source| DevServerError::Bind { port, source })?;
    DevServer::new(listener, settings).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::JwksSource;

    /// An RFC 7517 Appendix A.1 public key.
    const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM","kid":"1"}]}"#;

    fn settings(dir: &tempfile::TempDir) -> Settings {
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, JWKS).unwrap();
        Settings::new("0oa-background", JwksSource::File(path))
    }

    // A plain #[test]: the caller is not async, and Background needs no runtime of its own.
    #[test]
    fn serves_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let server = Background::start(0, settings(&dir)).unwrap();
        assert!(
            server.base().starts_with("http://127.0.0.1:"),
            "{}",
            server.base()
        );
        assert_eq!(
            server.endpoints().jwks,
            format!("{}/oauth2/v1/keys", server.base())
        );
        let jwks = server.endpoints().jwks.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let get = |url: String| {
            runtime.block_on(async move {
                let http = reqwest::Client::builder().no_proxy().build().unwrap();
                http.get(url).send().await.map(|r| r.status().as_u16())
            })
        };
        assert_eq!(get(jwks.clone()).unwrap(), 200);
        drop(server);
        assert!(get(jwks).is_err(), "nothing listens after the drop");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn refusals_come_back_from_start_inside_a_runtime_too() {
        let dir = tempfile::tempdir().unwrap();
        let empty = Settings {
            client_id: " ".into(),
            ..settings(&dir)
        };
        assert!(matches!(
            Background::start(0, empty),
            Err(DevServerError::EmptyClientId)
        ));
        let missing = Settings::new("c", JwksSource::File(dir.path().join("missing.json")));
        let err = Background::start(0, missing).err().unwrap();
        assert!(matches!(err, DevServerError::JwksRead { .. }), "{err}");
        // And one that starts is stopped by a drop inside the runtime without a panic.
        drop(Background::start(0, settings(&dir)).unwrap());
    }
}
