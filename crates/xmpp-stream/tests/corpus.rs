//! Every input of the fuzzing seed corpus and every crash the fuzzer ever found (kept in
//! `fuzz/regressions/`) goes through the parser on each test run: each must end with an
//! event stream that stops (EOF or a stream error), never a panic or a hang.

use std::path::Path;

use pushgate_xmpp::{Limits, StanzaReader, XmlError};

const LIMITS: Limits = Limits {
    max_stanza_bytes: 4096,
    max_depth: 16,
    max_attributes: 32,
};

async fn run(bytes: Vec<u8>) -> (usize, Option<&'static str>) {
    let mut r = StanzaReader::new(std::io::Cursor::new(bytes), LIMITS);
    let mut events = 0;
    loop {
        match r.next().await {
            Ok(_) => events += 1,
            Err(XmlError::Eof) => return (events, None),
            Err(e) => return (events, e.condition()),
        }
        assert!(events < 100_000, "parser does not make progress");
    }
}

#[tokio::test]
async fn corpus_and_regressions_parse_without_panic() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in ["corpus/stream", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for e in entries {
            let path = e?.path();
            if path.is_file() {
                let _ = run(std::fs::read(&path)?).await;
                n += 1;
            }
        }
    }
    assert!(n >= 6, "the seed corpus is missing ({n} files)");
    Ok(())
}

#[tokio::test]
async fn the_seeds_mean_what_they_say() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/stream");
    let (events, err) = run(std::fs::read(root.join("messages"))?).await;
    assert_eq!((events, err), (4, None), "header, two messages, close");
    let (_, err) = run(std::fs::read(root.join("billion-laughs"))?).await;
    assert_eq!(err, Some("restricted-xml"));
    let (_, err) = run(std::fs::read(root.join("odd"))?).await;
    assert_eq!(
        err,
        Some("restricted-xml"),
        "a processing instruction ends the stream"
    );
    Ok(())
}
