//! The output directory, written as root: never through a symlink, and
//! handed to the user who ran sudo.

use std::{os::unix::fs::MetadataExt as _, process::Command};

use crate::support::*;

#[test]
fn output_dir_symlink_is_not_followed() {
    if !bpf_available() {
        return;
    }
    let base = output_dir("output_dir_symlink");
    let elsewhere = base.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).expect("target dir");
    let link = base.join("link");
    std::os::unix::fs::symlink(&elsewhere, &link).expect("symlink");
    let output = Command::new(MEMSCOPE)
        .arg("run")
        .arg("-o")
        .arg(&link)
        .arg("--")
        .arg(fixture("leak_basic"))
        .output()
        .expect("memscope runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(8), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert_eq!(
        last,
        format!(
            "memscope: cannot write the report to {0}: {0} is a symbolic link: memscope does not follow it, give it a directory",
            link.display()
        )
    );
    let left: Vec<_> = std::fs::read_dir(&elsewhere).expect("list").collect();
    assert!(left.is_empty(), "written through the symlink: {left:?}");
    // The table still reaches the user.
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("leak_site <- main"), "{stdout}");
}

#[test]
fn sudo_user_owns_the_output() {
    if !bpf_available() {
        return;
    }
    let dir = output_dir("sudo_user_owns_the_output");
    let output = Command::new(MEMSCOPE)
        .arg("run")
        .arg("-o")
        .arg(&dir)
        .arg("--")
        .arg(fixture("leak_basic"))
        .env("SUDO_UID", "12345")
        .env("SUDO_GID", "12345")
        .output()
        .expect("memscope runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let ids = |path: &std::path::Path| {
        let m = std::fs::symlink_metadata(path).expect("stat");
        (m.uid(), m.gid(), m.mode() & 0o022)
    };
    assert_eq!(ids(&dir), (12345, 12345, 0), "directory");
    for name in memscope::output::FILES {
        assert_eq!(ids(&dir.join(name)), (12345, 12345, 0), "{name}");
    }
}
