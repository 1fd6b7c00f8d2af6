// Engine KV-event batch payloads (`kv_payload::parse`) and the engine map applying them, on
// any bytes.
//
// * `parse` returns a batch or `None`, never panics, and gives the same answer twice;
// * a batch's events name ranges and locations inside it; stores without a parent report
//   their block sizes in `root_sizes`;
// * applying it to an engine map (every root size given a namespace) applies everything and
//   queues operations whose locations the map can name.

use _core::engine_map::EngineMap;
use _core::kv_payload::{parse, Event};

/// One input through the target's checks; panics on a finding.
pub fn check(data: &[u8]) {
    let Some(p) = parse(data) else {
        return;
    };
    assert!(parse(data).is_some(), "parse is not deterministic");
    let roots = p.root_sizes();
    for ev in &p.events {
        match ev {
            Event::Stored {
                hashes,
                tokens,
                location,
                block_size,
                parent,
            } => {
                assert!(hashes.0 <= hashes.1 && hashes.1 <= p.hashes.len());
                assert!(tokens.0 <= tokens.1 && tokens.1 <= p.tokens.len());
                assert!((*location as usize) < p.locations.len());
                let (n, t) = (hashes.1 - hashes.0, tokens.1 - tokens.0);
                if parent.is_none() && t > 0 && *block_size >= 1 && t == n * block_size {
                    assert!(roots.contains(block_size));
                }
            }
            Event::Removed { hashes, location } => {
                assert!(hashes.0 <= hashes.1 && hashes.1 <= p.hashes.len());
                assert!((*location as usize) < p.locations.len());
            }
            Event::Cleared => {}
        }
    }
    let mut map = EngineMap::new(0);
    for (i, size) in roots.iter().enumerate() {
        map.set_root_namespace(*size, i as u32);
    }
    assert!(map.apply_parsed(&p).is_empty(), "a root size without a namespace");
    for (_, ops) in map.take_pending() {
        for op in ops {
            if op.location != u32::MAX {
                let _ = map.location_name(op.location);
            }
        }
    }
}
