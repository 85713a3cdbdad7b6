//! The witness wire protocol: postcard messages inside
//! [`ftvm_transport::frame`] frames, on QUIC bidirectional streams of a
//! connection negotiated with ALPN [`ftvm_transport::quic::ALPN_WITNESS`].
//!
//! A client opens a stream, writes one request frame (kind [`KIND_REQUEST`]),
//! finishes its side, and reads one response frame (kind [`KIND_RESPONSE`]).
//! Every request and response payload starts with the protocol version (a
//! postcard varint `u16`), decoded before anything else: a request whose
//! version is not [`PROTOCOL_VERSION`] is answered with
//! [`ResponseBody::Refused`] ([`RefuseCode::UnsupportedVersion`]) naming both
//! versions. A frame that fails to decode (bad magic, checksum, over the
//! maximum size, unknown kind) ends the connection, with the reason in the
//! QUIC close frame.

use serde::{Deserialize, Serialize};

/// The witness protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Frame kind of a request (client to witness).
pub const KIND_REQUEST: u8 = 1;
/// Frame kind of a response (witness to client).
pub const KIND_RESPONSE: u8 = 2;
/// Default maximum frame payload (bytes) for requests and responses.
pub const DEFAULT_MAX_FRAME: usize = 4096;
/// Maximum response payload a client accepts (a status of many clusters).
pub const MAX_RESPONSE_FRAME: usize = 65536;

/// QUIC application close code: the peer sent a bad frame.
pub const CLOSE_BAD_FRAME: u32 = 1;
/// QUIC application close code: the peer's certificate names no usable node.
pub const CLOSE_BAD_IDENTITY: u32 = 2;
/// QUIC application close code: the witness is shutting down.
pub const CLOSE_SHUTDOWN: u32 = 3;
/// QUIC application close code: a normal close by the client.
pub const CLOSE_DONE: u32 = 0;

/// A request: the version first, then the body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub version: u16,
    pub body: RequestBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestBody {
    /// Claim epoch `epoch_seen + 1` of `cluster` for the node named by the
    /// client's certificate.
    Claim { cluster: String, epoch_seen: u64 },
    /// The state of one cluster (members and operators), or of every cluster
    /// (operators only) when `cluster` is `None`.
    Status { cluster: Option<String> },
}

/// A response: the version first, then the body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub version: u16,
    pub body: ResponseBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseBody {
    /// The claimer holds `epoch` (durable before this was sent).
    Granted {
        cluster: String,
        epoch: u64,
    },
    /// Someone else holds `epoch`, or the claim was stale.
    Denied {
        cluster: String,
        holder: Option<String>,
        epoch: u64,
    },
    Status {
        clusters: Vec<ClusterStatus>,
    },
    /// The request was not acted on; nothing changed.
    Refused {
        code: RefuseCode,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub name: String,
    pub epoch: u64,
    pub holder: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseCode {
    UnsupportedVersion,
    UnknownCluster,
    NotMember,
    NotAuthorized,
    BadRequest,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error(
        "protocol version {found} is not supported (this build speaks version {PROTOCOL_VERSION})"
    )]
    UnsupportedVersion { found: u16 },
    #[error("undecodable message: {0}")]
    Decode(String),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("cannot encode message: {0}")]
    Encode(String),
}

fn decode<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<(u16, T), ProtoError> {
    let (version, rest) = postcard::take_from_bytes::<u16>(payload)
        .map_err(|e| ProtoError::Decode(format!("version: {e}")))?;
    if version != PROTOCOL_VERSION {
        return Err(ProtoError::UnsupportedVersion { found: version });
    }
    let (body, rest) =
        postcard::take_from_bytes::<T>(rest).map_err(|e| ProtoError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ProtoError::Trailing(rest.len()));
    }
    Ok((version, body))
}

/// Decodes a request payload, checking the version before the body.
pub fn decode_request(payload: &[u8]) -> Result<Request, ProtoError> {
    let (version, body) = decode(payload)?;
    Ok(Request { version, body })
}

/// Decodes a response payload, checking the version before the body.
pub fn decode_response(payload: &[u8]) -> Result<Response, ProtoError> {
    let (version, body) = decode(payload)?;
    Ok(Response { version, body })
}

/// Encodes any message (a [`Request`] or a [`Response`]).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtoError> {
    postcard::to_stdvec(msg).map_err(|e| ProtoError::Encode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_version_first() {
        let r = Request {
            version: PROTOCOL_VERSION,
            body: RequestBody::Claim {
                cluster: "prod".into(),
                epoch_seen: 7,
            },
        };
        let bytes = encode(&r).unwrap();
        assert_eq!(bytes[0], PROTOCOL_VERSION as u8);
        assert_eq!(decode_request(&bytes).unwrap(), r);
        let mut newer = bytes.clone();
        newer[0] = 99;
        assert!(matches!(
            decode_request(&newer),
            Err(ProtoError::UnsupportedVersion { found: 99 })
        ));
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(
            decode_request(&trailing),
            Err(ProtoError::Trailing(1))
        ));
        assert!(decode_request(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_request(&[]).is_err());
    }

    #[test]
    fn responses_round_trip() {
        for body in [
            ResponseBody::Granted {
                cluster: "c".into(),
                epoch: 1,
            },
            ResponseBody::Denied {
                cluster: "c".into(),
                holder: Some("node-a".into()),
                epoch: 2,
            },
            ResponseBody::Refused {
                code: RefuseCode::NotMember,
                reason: "x".into(),
            },
        ] {
            let r = Response {
                version: PROTOCOL_VERSION,
                body,
            };
            assert_eq!(decode_response(&encode(&r).unwrap()).unwrap(), r);
        }
    }
}
