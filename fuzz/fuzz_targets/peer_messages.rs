//! The peer protocol (gRPC over mTLS): a peer server decodes requests from any node with a
//! certificate of the fleet's CA, and a client decodes the replies of any peer in its list.
//! Input: one selector byte, then protobuf bytes. Requests are decoded with prost, checked
//! (`read_range_args`, `have_chunk_ids`) and handed to the real `NodeBackend` of
//! `horcrux serve`, serving the fixture repository directly and through a cache (hint checks,
//! hash merging, key checks, range checks). Replies are decoded and turned into core types the
//! way `PeerClient` does (`have_reply`, `collect` of data frames).

#![no_main]

mod common;

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use horcrux::fetch::FetchConfig;
use horcrux::serve::{NodeBackend, ServedRepo};
use horcrux::store::{FileStore, Store};
use horcrux_proto::peer::{self, PeerBackend, pb};
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// Largest range a request may read here (the server streams any length in 1 MiB frames;
/// this keeps inputs fast).
const MAX_READ: u64 = 4 << 20;

fn backend() -> &'static NodeBackend {
    static B: OnceLock<NodeBackend> = OnceLock::new();
    B.get_or_init(|| {
        let env = common::env();
        let store: Arc<dyn Store> = Arc::new(FileStore::new(common::fixture_repo()));
        NodeBackend::new(
            vec![
                ServedRepo {
                    name: "fixture".into(),
                    store: store.clone(),
                    read_through: false,
                },
                ServedRepo {
                    name: "through".into(),
                    store,
                    read_through: true,
                },
            ],
            Some(env.cache.clone()),
            FetchConfig {
                fill_chunks: false,
                ..FetchConfig::default()
            },
        )
        .expect("backend")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, msg)) = data.split_first() else {
        return;
    };
    let rt = &common::env().rt;
    let b = backend();
    match selector % 7 {
        0 => {
            let Ok(r) = pb::HaveRequest::decode(msg) else {
                return;
            };
            let Ok(ids) = peer::have_chunk_ids(&r) else {
                return;
            };
            if let Ok(present) = rt.block_on(b.exists(&r.repo, &r.keys)) {
                assert_eq!(present.len(), r.keys.len());
            }
            let p = rt.block_on(b.chunks_present(&ids));
            assert_eq!(p.len(), ids.len());
        }
        1 => {
            let Ok(r) = pb::ReadRangeRequest::decode(msg) else {
                return;
            };
            let Ok((range, hint)) = peer::read_range_args(&r) else {
                return;
            };
            if range.end - range.start > MAX_READ {
                return;
            }
            if let Ok(got) = rt.block_on(b.get_range(&r.repo, &r.key, range.clone(), hint.as_ref()))
            {
                assert_eq!(got.len() as u64, range.end - range.start);
            }
        }
        2 => {
            let Ok(r) = pb::GetRequest::decode(msg) else {
                return;
            };
            let _ = rt.block_on(b.get(&r.repo, &r.key));
        }
        3 => {
            let Ok(r) = pb::ListRequest::decode(msg) else {
                return;
            };
            if let Ok(entries) = rt.block_on(b.list(&r.repo, &r.prefix)) {
                assert!(
                    entries
                        .iter()
                        .all(|(k, _)| !k.starts_with('/') && !k.contains(".."))
                );
            }
        }
        4 => {
            // The client's view of a Have reply to (keys, chunks) questions.
            let (Some(&k), Some(&c)) = (msg.first(), msg.get(1)) else {
                return;
            };
            let Ok(r) = pb::HaveReply::decode(&msg[2..]) else {
                return;
            };
            if let Ok((keys, chunks)) = peer::have_reply(r, k as usize, c as usize) {
                assert_eq!((keys.len(), chunks.len()), (k as usize, c as usize));
            }
        }
        5 => {
            // A Get reply: length-delimited data frames; the first announces the size.
            let mut buf = msg;
            let mut frames = Vec::new();
            while !buf.is_empty() && frames.len() < 64 {
                match pb::DataFrame::decode_length_delimited(&mut buf) {
                    Ok(f) => frames.push(f),
                    Err(_) => break,
                }
            }
            let Some(total) = frames.first().map(|f| f.total_len) else {
                return;
            };
            let sum: u64 = frames.iter().map(|f| f.data.len() as u64).sum();
            let stream = futures_util::stream::iter(
                frames
                    .into_iter()
                    .map(|f| Ok::<Bytes, peer::PeerError>(f.data)),
            );
            match rt.block_on(peer::collect(stream, total)) {
                Ok(bytes) => assert_eq!(bytes.len() as u64, total),
                Err(_) => assert_ne!(sum, total),
            }
        }
        _ => {
            if let Ok(r) = pb::ListReply::decode(msg) {
                let _: Vec<(String, u64)> =
                    r.entries.into_iter().map(|e| (e.key, e.size)).collect();
            }
            let _ = pb::ChunkHint::decode(msg).map(|h| peer::ChunkHint::from_pb(&h));
        }
    }
});
