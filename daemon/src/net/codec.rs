//! The exchange codec: one unsigned-varint length-prefixed prost message per direction of a
//! `/nix-p2p-cache/exchange/1.0.0` stream (docs/protocol.md).
//!
//! Owns framing and limits: a message larger than `MAX_MESSAGE_SIZE`, a malformed prefix or
//! protobuf, or a want list longer than `MAX_WANTS_PER_REQUEST` is an `InvalidData` error
//! (the stream is dropped), never a panic and never an allocation beyond the limit. It does
//! not interpret the messages.

use std::io;

use async_trait::async_trait;
use libp2p::futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::request_response;
use libp2p::StreamProtocol;
use nix_p2p_cache_proto::v1 as pb;
use nix_p2p_cache_proto::{MAX_MESSAGE_SIZE, MAX_WANTS_PER_REQUEST};
use prost::Message;

/// Longest varint that can encode a length up to `u32::MAX`.
const MAX_PREFIX_LEN: usize = 5;

/// The prost codec of the exchange, with its size limit (`MAX_MESSAGE_SIZE` by default).
#[derive(Debug, Clone, Copy)]
pub struct ExchangeCodec {
    max_message_size: usize,
}

impl Default for ExchangeCodec {
    fn default() -> Self {
        Self {
            max_message_size: MAX_MESSAGE_SIZE,
        }
    }
}

impl ExchangeCodec {
    /// A codec with a smaller limit (tests).
    pub fn with_max_message_size(max_message_size: usize) -> Self {
        Self { max_message_size }
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Encodes `msg` with its varint length prefix; a message over `max` is refused (`InvalidInput`).
pub fn encode_frame<M: Message>(msg: &M, max: usize) -> io::Result<Vec<u8>> {
    let len = msg.encoded_len();
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("message of {len} bytes exceeds the limit of {max}"),
        ));
    }
    Ok(msg.encode_length_delimited_to_vec())
}

/// Reads one length-prefixed frame body of at most `max` bytes.
pub async fn read_frame<T: AsyncRead + Unpin>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    let mut len: u64 = 0;
    let mut done = false;
    for i in 0..MAX_PREFIX_LEN {
        let mut b = [0u8; 1];
        io.read_exact(&mut b).await?;
        len |= u64::from(b[0] & 0x7f) << (7 * i);
        if b[0] & 0x80 == 0 {
            done = true;
            break;
        }
    }
    if !done {
        return Err(invalid("length prefix is not a valid varint"));
    }
    if len > max as u64 {
        return Err(invalid(format!(
            "message of {len} bytes exceeds the limit of {max}"
        )));
    }
    let mut buf = vec![0u8; len as usize];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Decodes a request body and checks its limits.
pub fn decode_request(body: &[u8]) -> io::Result<pb::Request> {
    let req = pb::Request::decode(body).map_err(|e| invalid(format!("bad request: {e}")))?;
    match &req.kind {
        None => return Err(invalid("request has no kind")),
        Some(pb::request::Kind::Wantlist(w)) if w.entries.len() > MAX_WANTS_PER_REQUEST => {
            return Err(invalid(format!(
                "want list of {} entries exceeds the limit of {MAX_WANTS_PER_REQUEST}",
                w.entries.len()
            )))
        }
        Some(_) => {}
    }
    Ok(req)
}

/// Decodes a response body.
pub fn decode_response(body: &[u8]) -> io::Result<pb::Response> {
    pb::Response::decode(body).map_err(|e| invalid(format!("bad response: {e}")))
}

#[async_trait]
impl request_response::Codec for ExchangeCodec {
    type Protocol = StreamProtocol;
    type Request = pb::Request;
    type Response = pb::Response;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<pb::Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        let body = read_frame(io, self.max_message_size).await?;
        decode_request(&body)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<pb::Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        let body = read_frame(io, self.max_message_size).await?;
        decode_response(&body)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: pb::Request,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let frame = encode_frame(&req, self.max_message_size)?;
        io.write_all(&frame).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: pb::Response,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let frame = encode_frame(&res, self.max_message_size)?;
        io.write_all(&frame).await?;
        io.close().await
    }
}

#[cfg(test)]
mod tests {
    use libp2p::futures::executor::block_on;
    use libp2p::futures::io::Cursor;
    use libp2p::request_response::Codec as _;

    use super::*;

    fn proto() -> StreamProtocol {
        StreamProtocol::new(nix_p2p_cache_proto::EXCHANGE_PROTOCOL)
    }

    fn wants(n: usize) -> pb::Request {
        pb::Request {
            kind: Some(pb::request::Kind::Wantlist(pb::Wantlist {
                entries: (0..n)
                    .map(|i| pb::wantlist::Entry {
                        cid: vec![i as u8; 36],
                        priority: 1,
                        cancel: false,
                        want_type: pb::wantlist::WantType::Block as i32,
                        send_dont_have: true,
                    })
                    .collect(),
                full: true,
            })),
        }
    }

    #[test]
    fn round_trips_request_and_response() {
        let mut codec = ExchangeCodec::default();
        let req = wants(3);
        let mut buf = Cursor::new(Vec::new());
        block_on(codec.write_request(&proto(), &mut buf, req.clone())).unwrap();
        let mut rd = Cursor::new(buf.into_inner());
        assert_eq!(
            block_on(codec.read_request(&proto(), &mut rd)).unwrap(),
            req
        );

        let res = pb::Response {
            blocks: vec![pb::response::Block {
                cid: vec![1; 36],
                data: vec![2; 1000],
            }],
            block_presences: vec![pb::response::BlockPresence {
                cid: vec![3; 36],
                r#type: pb::response::PresenceType::DontHave as i32,
            }],
            manifest: Some(vec![4; 10]),
            narinfo: None,
            summary: Some(pb::PathSummary {
                generation: 7,
                hashes: 3,
                bits: vec![5; 100],
                paths: 12,
            }),
        };
        let mut buf = Cursor::new(Vec::new());
        block_on(codec.write_response(&proto(), &mut buf, res.clone())).unwrap();
        let mut rd = Cursor::new(buf.into_inner());
        assert_eq!(
            block_on(codec.read_response(&proto(), &mut rd)).unwrap(),
            res
        );
    }

    fn read_req(bytes: Vec<u8>) -> io::Result<pb::Request> {
        block_on(ExchangeCodec::default().read_request(&proto(), &mut Cursor::new(bytes)))
    }

    #[test]
    fn oversized_prefix_is_refused_before_allocating() {
        // Prefix claims 4 MiB + 1 bytes; no body follows.
        let mut bytes = Vec::new();
        prost::encoding::encode_varint(MAX_MESSAGE_SIZE as u64 + 1, &mut bytes);
        let err = read_req(bytes).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
        // A prefix that never ends.
        let err = read_req(vec![0xff; 16]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn garbage_and_truncation_fail_cleanly() {
        // Valid prefix, garbage body.
        let mut bytes = vec![8];
        bytes.extend_from_slice(&[0xff; 8]);
        assert_eq!(
            read_req(bytes).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        // Body shorter than its prefix.
        assert_eq!(
            read_req(vec![100, 1, 2]).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        // Empty stream, empty message (no kind).
        assert!(read_req(Vec::new()).is_err());
        assert_eq!(
            read_req(vec![0]).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        // Garbage response.
        let mut rd = Cursor::new(vec![3, 0xff, 0xff, 0xff]);
        let err = block_on(ExchangeCodec::default().read_response(&proto(), &mut rd));
        assert_eq!(err.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn limits_are_enforced_both_ways() {
        // Too many wants.
        let mut bytes = Vec::new();
        wants(MAX_WANTS_PER_REQUEST + 1)
            .encode_length_delimited(&mut bytes)
            .unwrap();
        let err = read_req(bytes).unwrap_err();
        assert!(err.to_string().contains("want list"), "{err}");
        let mut ok = Vec::new();
        wants(MAX_WANTS_PER_REQUEST)
            .encode_length_delimited(&mut ok)
            .unwrap();
        assert!(read_req(ok).is_ok());

        // A writer refuses to send an oversized message; a reader with a small limit refuses it.
        let mut small = ExchangeCodec::with_max_message_size(100);
        let big = pb::Response {
            blocks: vec![pb::response::Block {
                cid: vec![1; 36],
                data: vec![0; 200],
            }],
            ..Default::default()
        };
        let mut sink = Cursor::new(Vec::new());
        let err = block_on(small.write_response(&proto(), &mut sink, big.clone())).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(sink.into_inner().is_empty(), "nothing is sent");
        let mut buf = Cursor::new(Vec::new());
        block_on(ExchangeCodec::default().write_response(&proto(), &mut buf, big)).unwrap();
        let err = block_on(small.read_response(&proto(), &mut Cursor::new(buf.into_inner())));
        assert_eq!(err.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }
}
