//! A minimal HTTP/1.1 client for tests and tools (hyper), keeping connections alive.

use std::time::Duration;

use hyper::client::HttpConnector;
use hyper::{Body, Client, Method, Request};

/// An answer: status, headers we care about, body text.
#[derive(Clone, Debug)]
pub struct Answer {
    /// HTTP status code.
    pub status: u16,
    /// `Retry-After`, if sent.
    pub retry_after: Option<String>,
    /// `WWW-Authenticate`, if sent.
    pub www_authenticate: Option<String>,
    /// The body as text.
    pub body: String,
}

impl Answer {
    /// The body parsed as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A pooled client.
#[derive(Clone, Debug)]
pub struct HttpClient {
    inner: Client<HttpConnector>,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    /// A client with keep-alive and no timeouts of its own.
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        HttpClient {
            inner: Client::builder().build(connector),
        }
    }

    /// Sends a request with the given headers and body.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Body>,
    ) -> Result<Answer, hyper::Error> {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(body.into()).unwrap_or_default();
        let resp = self.inner.request(req).await?;
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        };
        let status = resp.status().as_u16();
        let retry_after = header("retry-after");
        let www_authenticate = header("www-authenticate");
        let bytes = hyper::body::to_bytes(resp.into_body()).await?;
        Ok(Answer {
            status,
            retry_after,
            www_authenticate,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }

    /// `POST` with a content type.
    pub async fn post(
        &self,
        url: &str,
        content_type: &str,
        body: impl Into<Body>,
    ) -> Result<Answer, hyper::Error> {
        self.send(Method::POST, url, &[("content-type", content_type)], body)
            .await
    }

    /// `GET`.
    pub async fn get(&self, url: &str) -> Result<Answer, hyper::Error> {
        self.send(Method::GET, url, &[], Body::empty()).await
    }
}
