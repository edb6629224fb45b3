//! Repository, branch and room names: whatever `Name::new` accepts is a single safe path
//! component, and the file provider never places a log outside its directory.
#![no_main]

use std::path::Component;
use std::sync::OnceLock;

use ksync_core::{LogName, Name};
use ksync_storage_file::FileProvider;
use libfuzzer_sys::fuzz_target;

fn provider() -> &'static (tempfile::TempDir, FileProvider) {
    static P: OnceLock<(tempfile::TempDir, FileProvider)> = OnceLock::new();
    P.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let provider = FileProvider::new(dir.path()).expect("provider");
        (dir, provider)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (a, b) = text.split_once('\u{0}').unwrap_or((text, "main"));
    let (Ok(repo), Ok(branch)) = (Name::new(a), Name::new(b)) else {
        return;
    };
    for name in [&repo, &branch] {
        let s = name.as_str();
        assert!(!s.is_empty() && s.len() <= ksync_core::MAX_NAME_LEN);
        assert!(!s.starts_with('.'));
        assert!(!s.contains(['/', '\\', '\u{0}']));
    }
    let (dir, provider) = provider();
    for log in [
        LogName::Room(repo.clone()),
        LogName::Branch { repo, branch },
    ] {
        let path = provider.path_of(&log);
        assert!(
            path.starts_with(dir.path()),
            "{path:?} escapes {:?}",
            dir.path()
        );
        let rest = path.strip_prefix(dir.path()).expect("prefix");
        assert!(
            rest.components().all(|c| matches!(c, Component::Normal(_))),
            "{path:?}"
        );
    }
});
