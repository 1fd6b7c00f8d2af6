// LMCache pull-socket frames (`lmcache_push::parse` and `read`), on any bytes. The input is
// split into frames at each 0xF1 0xF2 pair, as one read of the socket.
//
// * `parse` returns a message or `None`, never panics, gives the same answer twice, and
//   leaves the operations buffer as it was when it refuses;
// * `read` puts every frame that `parse` takes in exactly one segment, in order, and no other;
//   each holder's frames, operations and first/last seq are those of its frames, its gaps the
//   jumps between them; its runs never hold two of one kind in a row.

use _core::lmcache_push::{parse, read, OpKind};

/// One input through the target's checks; panics on a finding.
pub fn check(data: &[u8]) {
    let mut frames: Vec<&[u8]> = Vec::new();
    let mut rest = data;
    while let Some(at) = rest.windows(2).position(|w| w == [0xF1, 0xF2]) {
        frames.push(&rest[..at]);
        rest = &rest[at + 2..];
    }
    frames.push(rest);
    let mut ops = vec![(OpKind::Evict, 7)];
    let parsed: Vec<_> = frames
        .iter()
        .map(|f| {
            ops.truncate(1);
            let p = parse(f, &mut ops).map(|p| (p, ops[1..].to_vec()));
            if p.is_none() {
                assert_eq!(ops, [(OpKind::Evict, 7)], "a refused frame left operations");
            } else {
                assert!(ops.len() > 1, "a message without operations");
                let mut again = Vec::new();
                assert_eq!(parse(f, &mut again).as_ref(), p.as_ref().map(|x| &x.0));
                assert_eq!(again, ops[1..], "parse is not deterministic");
            }
            p
        })
        .collect();
    let segments = read(&frames);
    let mut covered = vec![false; frames.len()];
    let mut last_end = 0;
    for s in &segments {
        assert!(last_end <= s.start && s.start < s.end && s.end <= frames.len());
        last_end = s.end;
        let mut frames_in = 0;
        for h in &s.holders {
            let mine: Vec<_> = (s.start..s.end)
                .filter_map(|i| parsed[i].as_ref())
                .filter(|(p, _)| {
                    (p.instance_id, p.worker_id, p.location)
                        == (h.instance_id, h.worker_id, h.location)
                })
                .collect();
            assert_eq!(mine.len(), h.frames);
            frames_in += h.frames;
            assert_eq!(h.first_seq, mine[0].0.first_seq);
            assert_eq!(h.last_seq, mine[mine.len() - 1].0.last_seq);
            let gaps: Vec<_> = mine
                .windows(2)
                .filter(|w| w[1].0.first_seq != w[0].0.last_seq + 1)
                .map(|w| (w[0].0.last_seq + 1, w[1].0.first_seq))
                .collect();
            assert_eq!(h.gaps, gaps);
            let expected: Vec<_> = mine.iter().flat_map(|(_, o)| o.iter().copied()).collect();
            let got: Vec<_> = h
                .runs
                .iter()
                .flat_map(|r| r.keys.iter().map(move |&k| (r.kind, k)))
                .collect();
            assert_eq!(got, expected);
            assert!(h.runs.windows(2).all(|w| w[0].kind != w[1].kind));
        }
        assert_eq!(frames_in, s.end - s.start);
        for c in &mut covered[s.start..s.end] {
            *c = true;
        }
    }
    for (i, p) in parsed.iter().enumerate() {
        assert_eq!(
            covered[i],
            p.is_some(),
            "frame {i}: taken and covered differ"
        );
    }
}
