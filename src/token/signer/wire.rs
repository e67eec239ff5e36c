//! What crosses the pipes between the agent and a signer process: length-prefixed frames
//! (a 4-byte big-endian length, then the frame), each numbered so answers may come back in
//! any order. A frame is JSON, except the two that make up the signing traffic, which have
//! a fixed binary form (`SIGN`, `SIGNATURE`: no JSON or base64 either side per signature).
//!
//! A signer (`Role::Signer`) is sent only what a signature needs: `Prove` (a key it is
//! told about, with a challenge in the keyring's fixed form, which it signs and checks
//! under that key's public key before it will sign with it) and `Sign` (the key's id, the
//! algorithm, a digest of exactly that algorithm's length). The keeper (`Role::Keeper`, the
//! first process) also answers the key-management calls the agent makes (list, facts,
//! generate, rotation records, destroy, health): it never sends key material either way.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::jose::Alg;
use crate::token::{DeviceSettings, KeyFacts, KeyInfo, Listing, TokenDescription, TokenError};

/// The largest frame either side accepts (a listing of many keys fits many times).
pub(super) const MAX_FRAME: usize = 16 << 20;

/// The prefix of every proof-of-possession challenge (the keyring's form); a signer signs
/// no other `Prove` message.
pub(crate) const CHALLENGE_PREFIX: &[u8] = b"keybound proof of possession ";

/// A fresh proof-of-possession challenge: the prefix and 32 random bytes in base64url
/// (the keyring's approvals and the keys the agent tells its signers).
pub(crate) fn challenge() -> Result<Vec<u8>, TokenError> {
    let mut random = [0u8; 32];
    getrandom::getrandom(&mut random).map_err(|e| TokenError::Rng(e.to_string()))?;
    let mut message = CHALLENGE_PREFIX.to_vec();
    message.extend_from_slice(crate::jose::b64(random).as_bytes());
    Ok(message)
}

/// The first frame the agent sends: what to open.
#[derive(Serialize, Deserialize)]
pub(super) struct Start {
    pub role: Role,
    /// Sessions this process signs with; `None`: as the config and profile say.
    pub sessions: Option<usize>,
    pub device: DeviceSettings,
    /// Started by `keybound bench`: the process also answers `Raw`. A serving agent never
    /// sets it, so its signers refuse `Raw`.
    #[serde(default)]
    pub bench: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Role {
    /// Signs, and answers the agent's key-management calls.
    Keeper,
    /// Signs only.
    Signer,
}

/// The answer to `Start`.
#[derive(Clone, Serialize, Deserialize)]
pub(super) struct Ready {
    pub description: TokenDescription,
    /// Sessions as configured (the keeper's answer sizes the whole pool).
    pub sessions: usize,
    /// Sessions per signer process, from the profile.
    pub per_signer: Option<usize>,
    pub pid: u32,
    /// The one session signs on the thread that reads requests.
    #[serde(default)]
    pub inline: bool,
    /// Algorithms whose mechanism hashes on the device, so `Sign` needs the input.
    #[serde(default)]
    pub whole_input: Vec<Alg>,
}

#[derive(Serialize, Deserialize)]
pub(super) enum Request {
    Sign {
        #[serde(with = "b64")]
        id: Vec<u8>,
        alg: Alg,
        #[serde(with = "b64")]
        digest: Vec<u8>,
        /// The signing input itself, only for an algorithm whose profile mechanism hashes
        /// on the device (`Ready::whole_input`); it must hash to `digest`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<Vec<u8>>,
    },
    Prove {
        key: KeyInfo,
        #[serde(with = "b64")]
        challenge: Vec<u8>,
    },
    /// `bench` only: sign a fixed digest with a told key on every session of the process
    /// for `millis`, and answer how many (the device's raw rate, in this process).
    Raw {
        #[serde(with = "b64")]
        id: Vec<u8>,
        millis: u64,
    },
    Keys,
    Health,
    Facts {
        key: KeyInfo,
    },
    Generate {
        label: String,
        alg: Alg,
    },
    Records {
        slot: String,
    },
    PutRecord {
        slot: String,
        seq: u64,
        bytes: Vec<u8>,
    },
    RemoveRecord {
        slot: String,
        seq: u64,
        bytes: Vec<u8>,
    },
    Destroy {
        key: KeyInfo,
    },
}

impl Request {
    /// What the request is, for logs and refusals.
    pub(super) fn name(&self) -> &'static str {
        match self {
            Request::Sign { .. } => "sign",
            Request::Prove { .. } => "prove",
            Request::Raw { .. } => "raw",
            Request::Keys => "keys",
            Request::Health => "health",
            Request::Facts { .. } => "facts",
            Request::Generate { .. } => "generate",
            Request::Records { .. } => "records",
            Request::PutRecord { .. } => "put_record",
            Request::RemoveRecord { .. } => "remove_record",
            Request::Destroy { .. } => "destroy",
        }
    }
}

#[derive(Serialize, Deserialize)]
pub(super) enum Answer {
    Ready(Ready),
    Signature(#[serde(with = "b64")] Vec<u8>),
    /// `None`: the device itself bound the key to its public key (a TPM key with auth).
    Proof(Option<Vec<u8>>),
    Listing(Listing),
    Facts(KeyFacts),
    Key(KeyInfo),
    Records(Vec<Vec<u8>>),
    Count(u64),
    Done,
}

/// One numbered message.
#[derive(Serialize, Deserialize)]
pub(super) struct Frame<T> {
    pub n: u64,
    pub body: T,
}

pub(super) type Outcome = Result<Answer, TokenError>;

/// The first byte of a binary `Request::Sign` frame (a JSON frame starts with `{`): then
/// `n` (8 bytes, big-endian), the algorithm (its index in [`Alg::ALL`]), the id's length
/// (1 byte), the id, and the digest (the rest; its length is checked against the
/// algorithm by the signer). A `Sign` that carries its signing input goes as JSON.
const SIGN: u8 = 1;
/// The first byte of a binary `Ok(Answer::Signature)` frame: then `n` (8 bytes,
/// big-endian) and the signature (the rest).
const SIGNATURE: u8 = 2;

/// Appends the binary form of a `Request::Sign` without its signing input; false (nothing
/// appended) when the id is too long for it.
fn put_sign(n: u64, id: &[u8], alg: Alg, digest: &[u8], out: &mut Vec<u8>) -> bool {
    let (Ok(id_len), Some(alg)) = (
        u8::try_from(id.len()),
        Alg::ALL.iter().position(|a| *a == alg),
    ) else {
        return false;
    };
    put_tagged(out, SIGN, n);
    out.extend_from_slice(&[alg as u8, id_len]);
    out.extend_from_slice(id);
    out.extend_from_slice(digest);
    true
}

/// Starts a binary frame: its tag and `n`.
fn put_tagged(out: &mut Vec<u8>, tag: u8, n: u64) {
    out.push(tag);
    out.extend_from_slice(&n.to_be_bytes());
}

/// `n` and the rest of a binary frame tagged `tag`; `None` for another tag or too short.
fn tagged(frame: &[u8], tag: u8) -> Option<(u64, &[u8])> {
    let (&first, rest) = frame.split_first()?;
    let (n, rest) = rest.split_first_chunk::<8>()?;
    (first == tag).then(|| (u64::from_be_bytes(*n), rest))
}

/// A frame's body: JSON, or for the signing traffic the binary form.
pub(super) trait Body: Serialize + DeserializeOwned {
    /// Appends the body's binary form (`SIGN`, `SIGNATURE`) when it has one.
    fn put_binary(&self, _n: u64, _out: &mut Vec<u8>) -> bool {
        false
    }

    /// Reads a frame in the binary form; `None` when it is not one of this type's.
    fn binary(_frame: &[u8]) -> Option<Frame<Self>> {
        None
    }
}

impl Body for Start {}

impl Body for Request {
    fn put_binary(&self, n: u64, out: &mut Vec<u8>) -> bool {
        let Request::Sign {
            id,
            alg,
            digest,
            message: None,
        } = self
        else {
            return false;
        };
        put_sign(n, id, *alg, digest, out)
    }

    fn binary(frame: &[u8]) -> Option<Frame<Request>> {
        let (n, rest) = tagged(frame, SIGN)?;
        let (&[alg, id_len], rest) = rest.split_first_chunk::<2>()?;
        let alg = *Alg::ALL.get(usize::from(alg))?;
        let (id, digest) = rest.split_at_checked(usize::from(id_len))?;
        Some(Frame {
            n,
            body: Request::Sign {
                id: id.to_vec(),
                alg,
                digest: digest.to_vec(),
                message: None,
            },
        })
    }
}

impl Body for Outcome {
    fn put_binary(&self, n: u64, out: &mut Vec<u8>) -> bool {
        let Ok(Answer::Signature(signature)) = self else {
            return false;
        };
        put_tagged(out, SIGNATURE, n);
        out.extend_from_slice(signature);
        true
    }

    fn binary(frame: &[u8]) -> Option<Frame<Outcome>> {
        let (n, signature) = tagged(frame, SIGNATURE)?;
        Some(Frame {
            n,
            body: Ok(Answer::Signature(signature.to_vec())),
        })
    }
}

/// One frame's body bytes (without the length) as a `T`.
pub(super) fn decode<T: Body>(frame: &[u8]) -> io::Result<Frame<T>> {
    if frame.first() == Some(&b'{') {
        return serde_json::from_slice(frame)
            .map_err(|e| io::Error::other(format!("a malformed frame: {e}")));
    }
    T::binary(frame).ok_or_else(|| io::Error::other("a malformed or unexpected binary frame"))
}

/// Appends one frame to `out`.
pub(super) fn encode<T: Body>(n: u64, body: &T, out: &mut Vec<u8>) -> io::Result<()> {
    framed(out, |out| {
        if body.put_binary(n, out) {
            Ok(())
        } else {
            put_json(n, body, out)
        }
    })
}

/// Appends frame `n`'s JSON form.
fn put_json<T: Serialize>(n: u64, body: &T, out: &mut Vec<u8>) -> io::Result<()> {
    serde_json::to_writer(&mut *out, &Frame { n, body }).map_err(io::Error::other)
}

/// Appends what `put` appends, behind its length; nothing on an error.
fn framed(out: &mut Vec<u8>, put: impl FnOnce(&mut Vec<u8>) -> io::Result<()>) -> io::Result<()> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    let len = put(out).and_then(|()| {
        u32::try_from(out.len() - start - 4)
            .ok()
            .filter(|l| (*l as usize) <= MAX_FRAME)
            .ok_or_else(|| io::Error::other("frame too large"))
    });
    match len {
        Ok(len) => {
            out[start..start + 4].copy_from_slice(&len.to_be_bytes());
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

/// Appends frame `n`, a `Request::Sign` without its signing input, from borrowed parts: the
/// agent writes every signature's request this way, without copying the id and digest
/// into a [`Request`] first. The same bytes as [`encode`] of that request.
pub(super) fn encode_sign(
    n: u64,
    id: &[u8],
    alg: Alg,
    digest: &[u8],
    out: &mut Vec<u8>,
) -> io::Result<()> {
    framed(out, |out| {
        if put_sign(n, id, alg, digest, out) {
            return Ok(());
        }
        let request = Request::Sign {
            id: id.to_vec(),
            alg,
            digest: digest.to_vec(),
            message: None,
        };
        put_json(n, &request, out)
    })
}

pub(super) fn write<T: Body>(w: &mut impl Write, n: u64, body: &T) -> io::Result<()> {
    let mut buf = Vec::with_capacity(256);
    encode(n, body, &mut buf)?;
    w.write_all(&buf)?;
    w.flush()
}

/// The next frame; `Ok(None)` at a clean end of the stream.
pub(super) fn read<T: Body>(r: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<Option<Frame<T>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::other(format!(
            "a frame of {len} bytes (at most {MAX_FRAME})"
        )));
    }
    buf.clear();
    buf.resize(len, 0);
    r.read_exact(buf)?;
    decode(buf).map(Some)
}

/// What starts `buffered`: a whole frame, or how many more bytes one needs.
pub(super) enum Peek<'a> {
    /// The frame's body, and the bytes the frame takes with its length.
    Whole(&'a [u8], usize),
    /// At least this many more bytes are needed for a whole frame.
    Short(usize),
}

/// The frame at the start of `buffered`; an error for a length over [`MAX_FRAME`].
pub(super) fn peek(buffered: &[u8]) -> io::Result<Peek<'_>> {
    let Some((len, rest)) = buffered.split_first_chunk::<4>() else {
        return Ok(Peek::Short(4 - buffered.len()));
    };
    let len = u32::from_be_bytes(*len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::other(format!(
            "a frame of {len} bytes (at most {MAX_FRAME})"
        )));
    }
    Ok(match rest.get(..len) {
        Some(body) => Peek::Whole(body, 4 + len),
        None => Peek::Short(len - rest.len()),
    })
}

/// Decodes every whole frame at the start of `buf` into `out`, and removes their bytes
/// (a partial frame stays for the next read).
pub(super) fn take_frames<T: Body>(buf: &mut Vec<u8>, out: &mut Vec<Frame<T>>) -> io::Result<()> {
    let mut at = 0;
    let result = loop {
        match peek(&buf[at..]) {
            Ok(Peek::Whole(body, taken)) => match decode(body) {
                Ok(frame) => {
                    out.push(frame);
                    at += taken;
                }
                Err(e) => break Err(e),
            },
            Ok(Peek::Short(_)) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    buf.drain(..at);
    result
}

/// How many whole frames `buffered` starts with, counting no further than `up_to`.
pub(super) fn complete_frames(mut buffered: &[u8], up_to: usize) -> usize {
    let mut n = 0;
    while n < up_to
        && let Ok(Peek::Whole(_, taken)) = peek(buffered)
    {
        buffered = &buffered[taken..];
        n += 1;
    }
    n
}

/// Bytes as base64url strings (the hot path's digests and signatures).
mod b64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(&crate::jose::b64(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(de)?;
        crate::jose::b64_decode(&s, "bytes").map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_errors_keep_their_variant() {
        let mut buf = Vec::new();
        let err: Outcome = Err(TokenError::Reapprove { label: "k".into() });
        encode(7, &err, &mut buf).unwrap();
        encode(
            8,
            &Request::Sign {
                id: vec![1, 2],
                alg: Alg::ES256,
                digest: vec![9; 32],
                message: None,
            },
            &mut buf,
        )
        .unwrap();
        let mut r = &buf[..];
        let mut scratch = Vec::new();
        let f: Frame<Outcome> = read(&mut r, &mut scratch).unwrap().unwrap();
        assert_eq!(f.n, 7);
        assert!(matches!(f.body, Err(TokenError::Reapprove { label }) if label == "k"));
        let f: Frame<Request> = read(&mut r, &mut scratch).unwrap().unwrap();
        assert!(matches!(f.body, Request::Sign { digest, .. } if digest == vec![9; 32]));
        assert!(read::<Request>(&mut r, &mut scratch).unwrap().is_none());
    }

    #[test]
    fn signing_traffic_goes_in_binary_frames_and_a_bad_one_is_refused() {
        let sign = |message: Option<Vec<u8>>| Request::Sign {
            id: vec![7; 20],
            alg: Alg::ES384,
            digest: vec![9; 48],
            message,
        };
        let mut buf = Vec::new();
        encode(5, &sign(None), &mut buf).unwrap();
        // Length, tag, n, alg, id length, id, digest: no JSON.
        assert_eq!(buf.len(), 4 + 1 + 8 + 2 + 20 + 48);
        assert_eq!(buf[4], SIGN);
        encode(6, &sign(Some(b"a.b".to_vec())), &mut buf).unwrap();
        let mut frames: Vec<Frame<Request>> = Vec::new();
        take_frames(&mut buf, &mut frames).unwrap();
        let [first, second] = &frames[..] else {
            panic!("two frames")
        };
        assert!(
            matches!(&first.body, Request::Sign { id, alg: Alg::ES384, digest, message: None }
            if first.n == 5 && *id == vec![7; 20] && *digest == vec![9; 48])
        );
        // One that carries its signing input goes as JSON, and keeps it.
        assert!(matches!(&second.body, Request::Sign { message: Some(m), .. } if m == b"a.b"));

        let answer: Outcome = Ok(Answer::Signature(vec![3; 64]));
        encode(9, &answer, &mut buf).unwrap();
        assert_eq!(buf[4], SIGNATURE);
        let mut answers: Vec<Frame<Outcome>> = Vec::new();
        take_frames(&mut buf, &mut answers).unwrap();
        assert!(
            matches!(&answers[0].body, Ok(Answer::Signature(s)) if answers[0].n == 9 && *s == vec![3; 64])
        );

        // An unknown algorithm, an id longer than the frame, a signature where a request
        // is read, a request where an answer is read: refused, not guessed at.
        let frame = |body: &[u8]| {
            let mut f = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
            f.extend_from_slice(body);
            f
        };
        let n = 1u64.to_be_bytes();
        for bad in [
            [&[SIGN][..], &n, &[9, 0], &[1; 32]].concat(),
            [&[SIGN][..], &n, &[0, 40], &[1; 32]].concat(),
            [&[SIGN][..], &[0; 3]].concat(),
            [&[SIGNATURE][..], &n, &[1; 64]].concat(),
            vec![0x7f],
        ] {
            assert!(take_frames::<Request>(&mut frame(&bad), &mut frames).is_err());
        }
        let request = [&[SIGN][..], &n, &[0, 1, 1], &[1; 32]].concat();
        assert!(take_frames::<Request>(&mut frame(&request), &mut frames).is_ok());
        assert!(take_frames::<Outcome>(&mut frame(&request), &mut answers).is_err());
    }

    #[test]
    fn a_sign_from_borrowed_parts_is_the_same_frame() {
        // A short id goes binary, a 300-byte one as JSON: both as `encode` writes them.
        for id in [vec![7u8; 20], vec![7u8; 300]] {
            let (mut borrowed, mut owned) = (vec![0xaa], vec![0xaa]);
            encode_sign(5, &id, Alg::ES384, &[9; 48], &mut borrowed).unwrap();
            let request = Request::Sign {
                id: id.clone(),
                alg: Alg::ES384,
                digest: vec![9; 48],
                message: None,
            };
            encode(5, &request, &mut owned).unwrap();
            assert_eq!(borrowed, owned);
        }
    }

    #[test]
    fn whole_frames_are_counted_up_to_the_bound() {
        let mut buf = Vec::new();
        for n in 1..=3 {
            encode(n, &Request::Health, &mut buf).unwrap();
        }
        assert_eq!(complete_frames(&buf, 10), 3);
        assert_eq!(complete_frames(&buf, 2), 2);
        assert_eq!(complete_frames(&buf[..buf.len() - 1], 10), 2);
        assert_eq!(complete_frames(&buf[..3], 10), 0);
        assert_eq!(complete_frames(&[], 10), 0);
        let mut part = buf[..buf.len() - 1].to_vec();
        let mut frames: Vec<Frame<Request>> = Vec::new();
        take_frames(&mut part, &mut frames).unwrap();
        assert_eq!(frames.iter().map(|f| f.n).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(complete_frames(&part, 10), 0);
        part.push(*buf.last().unwrap());
        take_frames(&mut part, &mut frames).unwrap();
        assert!(part.is_empty() && frames.len() == 3 && frames[2].n == 3);
        let mut bad = vec![0, 0, 0, 2, b'{', b'}'];
        assert!(take_frames::<Request>(&mut bad, &mut frames).is_err());
    }

    #[test]
    fn a_pkcs11_error_keeps_its_return_value() {
        let e = TokenError::Pkcs11 {
            function: "C_Sign".into(),
            rv: cryptoki::error::RvError::SessionHandleInvalid,
            hint: String::new(),
        };
        let json = serde_json::to_string(&e).unwrap();
        let back: TokenError = serde_json::from_str(&json).unwrap();
        assert_eq!(back.kind(), e.kind());
        assert_eq!(back.to_string(), e.to_string());
    }
}
