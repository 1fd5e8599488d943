//! Feeds arbitrary bytes to the edge's stream parser, the way a hostile client would after
//! connecting: it must end with a stream error or EOF, never panic or grow without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pushgate_xmpp::{Limits, StanzaReader};

const LIMITS: Limits = Limits { max_stanza_bytes: 4096, max_depth: 16, max_attributes: 32 };

fuzz_target!(|data: &[u8]| {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else { return };
    rt.block_on(async {
        let mut r = StanzaReader::new(std::io::Cursor::new(data.to_vec()), LIMITS);
        // each call consumes input or fails, so this ends; the bound is a belt and braces
        for _ in 0..10_000 {
            if r.next().await.is_err() {
                break;
            }
        }
    });
});
