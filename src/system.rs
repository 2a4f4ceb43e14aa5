//! Checks of the running machine for what ruyi needs: `ruyi check-system`
//! prints them, and `ruyi serve` refuses to start on a hard failure with a
//! message that names the fix. Each check reads the kernel's own files or
//! limits; none changes anything.

use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
}

/// One setting, what was found, and how to fix it when it is not right.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    pub found: String,
    pub fix: Option<String>,
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

fn rlimit(resource: libc::__rlimit_resource_t) -> Option<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    let ok = unsafe { libc::getrlimit(resource, &mut limit) } == 0;
    ok.then_some((limit.rlim_cur, limit.rlim_max))
}

fn show_limit(value: u64) -> String {
    if value == libc::RLIM_INFINITY {
        "unlimited".into()
    } else {
        value.to_string()
    }
}

/// Every check, for this configuration.
pub fn checks(config: &Config) -> Vec<Check> {
    let mut out = Vec::new();

    let kernel = read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_default();
    let version: Vec<u32> = kernel
        .split(|c: char| !c.is_ascii_digit())
        .take(2)
        .filter_map(|p| p.parse().ok())
        .collect();
    let new_enough = matches!(version.as_slice(), [major, minor] if (*major, *minor) >= (5, 8));
    out.push(Check {
        name: "kernel",
        verdict: if new_enough {
            Verdict::Pass
        } else {
            Verdict::Fail
        },
        found: kernel,
        fix: (!new_enough).then(|| "glommio needs Linux 5.8 or newer for io_uring".into()),
    });

    let disabled = read_trimmed("/proc/sys/kernel/io_uring_disabled");
    let (verdict, fix) = match disabled.as_deref() {
        None | Some("0") => (Verdict::Pass, None),
        Some("1") => (
            Verdict::Warn,
            Some("io_uring is limited to the io_uring_group: run ruyi in it, or sysctl kernel.io_uring_disabled=0".into()),
        ),
        Some(_) => (
            Verdict::Fail,
            Some("io_uring is disabled: sysctl -w kernel.io_uring_disabled=0 (tuning/sysctl.conf)".into()),
        ),
    };
    out.push(Check {
        name: "io_uring",
        verdict,
        found: format!(
            "kernel.io_uring_disabled = {}",
            disabled.unwrap_or_else(|| "absent (enabled)".into())
        ),
        fix,
    });

    let is_root = unsafe { libc::geteuid() } == 0;
    if let Some((soft, _)) = rlimit(libc::RLIMIT_MEMLOCK) {
        // glommio registers buffers per executor; as root the kernel does
        // not charge io_uring against memlock.
        let needed = 8 * 1024 * 1024 * u64::from(config.shard_count());
        let ok = is_root || soft == libc::RLIM_INFINITY || soft >= needed;
        out.push(Check {
            name: "memlock",
            verdict: if ok { Verdict::Pass } else { Verdict::Warn },
            found: format!("soft limit {} bytes{}", show_limit(soft), if is_root { " (root: not charged)" } else { "" }),
            fix: (!ok).then(|| "raise LimitMEMLOCK (tuning/ruyi.service) or memlock in tuning/limits.conf to unlimited".into()),
        });
    }

    if let Some((soft, hard)) = rlimit(libc::RLIMIT_NOFILE) {
        let wanted = (config.limits.connections_per_shard_max as u64)
            .saturating_mul(u64::from(config.shard_count()))
            .saturating_add(1024);
        let verdict = if soft >= wanted {
            Verdict::Pass
        } else {
            Verdict::Warn
        };
        out.push(Check {
            name: "nofile",
            verdict,
            found: format!("soft {} hard {} (connections_per_shard_max x shards needs {wanted})", show_limit(soft), show_limit(hard)),
            fix: (soft < wanted).then(|| format!("raise LimitNOFILE to at least {wanted} (tuning/ruyi.service, tuning/limits.conf)")),
        });
    }

    if let Some(somaxconn) =
        read_trimmed("/proc/sys/net/core/somaxconn").and_then(|s| s.parse::<u32>().ok())
    {
        let ok = somaxconn >= config.limits.listen_backlog;
        out.push(Check {
            name: "somaxconn",
            verdict: if ok { Verdict::Pass } else { Verdict::Warn },
            found: format!(
                "net.core.somaxconn = {somaxconn}, listen_backlog = {}",
                config.limits.listen_backlog
            ),
            fix: (!ok).then(|| "sysctl -w net.core.somaxconn=65535 (tuning/sysctl.conf)".into()),
        });
    }

    if let Some(range) = read_trimmed("/proc/sys/net/ipv4/ip_local_port_range") {
        let ports: Vec<u32> = range
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        let width = match ports.as_slice() {
            [low, high] => high.saturating_sub(*low),
            _ => 0,
        };
        out.push(Check {
            name: "port range",
            verdict: if width >= 28_000 { Verdict::Pass } else { Verdict::Warn },
            found: format!("net.ipv4.ip_local_port_range = {range}"),
            fix: (width < 28_000).then(|| "sysctl -w net.ipv4.ip_local_port_range=\"1024 65535\" (tuning/sysctl.conf); it bounds outgoing connections such as webhooks and local load tests".into()),
        });
    }

    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shards = usize::from(config.shard_count());
    out.push(Check {
        name: "cpus",
        verdict: if shards <= cpus {
            Verdict::Pass
        } else {
            Verdict::Warn
        },
        found: format!("{cpus} available, {shards} shards configured"),
        fix: (shards > cpus).then(|| {
            "more shards than CPUs share cores: set server.shards = 0 (one per CPU)".into()
        }),
    });
    out
}

/// Prints the checks; returns the worst verdict.
pub fn report(checks: &[Check]) -> Verdict {
    for check in checks {
        let tag = match check.verdict {
            Verdict::Pass => "pass",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        };
        println!("{tag:4}  {:11} {}", check.name, check.found);
        if let Some(fix) = &check.fix {
            println!("      {:11} fix: {fix}", "");
        }
    }
    checks
        .iter()
        .map(|c| c.verdict)
        .max()
        .unwrap_or(Verdict::Pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_passes_the_hard_checks() {
        // io_uring and the kernel version are what every test server needs.
        let checks = checks(&Config::default());
        for name in ["kernel", "io_uring", "cpus"] {
            let check = checks.iter().find(|c| c.name == name).unwrap();
            assert_ne!(check.verdict, Verdict::Fail, "{check:?}");
        }
    }
}
