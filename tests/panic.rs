//! A panic on any thread stops the whole process (`ruyi serve` installs
//! `ruyi::server::abort_on_panic` first thing): a gateway with a dead shard
//! must not stay up accepting logins it will never answer.
//!
//! The test runs itself again as a child process that installs the hook,
//! panics on a second thread, and would report success if it outlived the
//! panic.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

const CHILD: &str = "RUYI_PANIC_TEST_CHILD";
/// The signal `std::process::abort` raises on Linux.
const SIGABRT: i32 = 6;

#[test]
fn a_panic_on_any_thread_stops_the_process() {
    if std::env::var_os(CHILD).is_some() {
        ruyi::server::abort_on_panic();
        let shard = std::thread::Builder::new()
            .name("shard-1".into())
            .spawn(|| panic!("a broken invariant"))
            .expect("spawn");
        let _ = shard.join();
        // Only reached if the panic left the process up.
        std::thread::sleep(Duration::from_millis(200));
        println!("STILL RUNNING");
        return;
    }
    let exe = std::env::current_exe().expect("test executable");
    let output = Command::new(exe)
        .args([
            "--exact",
            "a_panic_on_any_thread_stops_the_process",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stdout.contains("STILL RUNNING"),
        "the process outlived a panic:\n{stdout}\n{stderr}"
    );
    assert_eq!(
        output.status.signal(),
        Some(SIGABRT),
        "the child should abort: {:?}\n{stderr}",
        output.status
    );
    assert!(
        stderr.contains("a broken invariant"),
        "the panic is printed: {stderr}"
    );
    assert!(
        stderr.contains("stopping the process so it can be restarted"),
        "{stderr}"
    );
}
