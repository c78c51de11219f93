//! A local stack, written once for the demo, the tests and the benchmark: the
//! settings of a paysync that talks to a given broker and the built-in simulator
//! (every simulated connector configured with the simulator's credentials), free
//! ports, unique topic names, an Apache Kafka process, and paysync as a child
//! process with its settings file and log in a scratch directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on loopback (bound and released; fine for tests on one host).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// Topic and group names unique to one test or scenario.
#[derive(Clone, Debug)]
pub struct Topics {
    /// Input topic.
    pub input: String,
    /// Output topic.
    pub output: String,
    /// Dead-letter topic.
    pub dlq: String,
    /// Consumer group.
    pub group: String,
    /// Partitions of the input and output topics.
    pub partitions: i32,
}

impl Topics {
    /// Fresh names tagged with `name` and a random suffix.
    pub fn unique(name: &str, partitions: i32) -> Topics {
        let tag = format!("{name}-{}", fastrand::u32(..));
        Topics {
            input: format!("{tag}.requests"),
            output: format!("{tag}.events"),
            dlq: format!("{tag}.requests.dlq"),
            group: format!("{tag}.group"),
            partitions,
        }
    }

    /// (topic, partitions) of the three topics, for creating them.
    pub fn specs(&self) -> Vec<(&str, i32)> {
        vec![
            (self.input.as_str(), self.partitions),
            (self.output.as_str(), self.partitions),
            (self.dlq.as_str(), 1),
        ]
    }
}

/// The settings of a paysync on a local stack, as TOML.
#[derive(Debug, Clone)]
pub struct StackSettings<'a> {
    /// Bootstrap servers.
    pub brokers: &'a str,
    /// Topics and group.
    pub topics: &'a Topics,
    /// The simulator's base URL (it serves every simulated connector).
    pub simulator: &'a str,
    /// Where `/metrics`, `/healthz` and `/readyz` listen.
    pub listen: SocketAddr,
    /// Appended as is (more tables, or keys of `[connectors.*]` sub-tables).
    pub extra: &'a str,
}

impl StackSettings<'_> {
    /// The TOML text: quick commits, a 6 s session timeout (a new group forms in
    /// about half of it), short retries, and every simulated connector.
    pub fn toml(&self) -> String {
        let t = self.topics;
        let mut out = format!(
            r#"
[kafka]
brokers = "{brokers}"
group_id = "{group}"
input_topic = "{input}"
output_topic = "{output}"
dead_letter_topic = "{dlq}"
commit_interval = "200ms"
[kafka.consumer]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
[http]
listen = "{listen}"
[log]
level = "warn"
[processing]
shutdown_timeout = "10s"
"#,
            brokers = self.brokers,
            group = t.group,
            input = t.input,
            output = t.output,
            dlq = t.dlq,
            listen = self.listen,
        );
        for connector in super::simulator::SIMULATED {
            let (name, account) = (connector.name, connector.account);
            out.push_str(&format!(
                r#"[connectors.{name}]
base_url = "{simulator}"
request_timeout = "2s"
[connectors.{name}.retry]
initial_backoff = "20ms"
max_backoff = "200ms"
[connectors.{name}.accounts.default]
{account}
"#,
                simulator = self.simulator,
            ));
        }
        out.push_str(self.extra);
        out
    }
}

/// Apache Kafka as a child process: one KRaft node started by
/// `tests/kafka/broker.sh` in a scratch directory (the jars come from Maven
/// Central once, cached outside the repository), stopped on drop. For the chaos
/// run and the benchmark; tests take `PAYSYNC_TEST_BROKERS` instead.
pub struct KafkaProcess {
    dir: PathBuf,
    bootstrap: String,
}

impl KafkaProcess {
    fn script(command: &str, dir: &Path) -> Result<String, String> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kafka/broker.sh");
        let out = Command::new(&script)
            .arg(command)
            .arg(dir)
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!("{} {command} failed", script.display()));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Starts a fresh node on free ports.
    pub fn start() -> Result<KafkaProcess, String> {
        let dir = std::env::temp_dir().join(format!(
            "paysync-kafka-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let bootstrap = Self::script("start", &dir)?;
        Ok(KafkaProcess { dir, bootstrap })
    }

    /// Its bootstrap servers.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// Stops the node (SIGTERM, a clean shutdown) and starts it again on the same
    /// ports and data.
    pub fn restart(&self) -> Result<(), String> {
        Self::script("restart", &self.dir).map(drop)
    }

    /// The broker's process id (for CPU accounting), while it runs.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Where its data and `server.log` are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for KafkaProcess {
    fn drop(&mut self) {
        let _ = Self::script("kill", &self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `paysync run` as a child process with a settings file and a log in a scratch
/// directory (removed on drop, with the process killed if still running).
pub struct PaysyncProcess {
    /// The process.
    pub child: Child,
    /// Where its HTTP endpoints listen.
    pub http: SocketAddr,
    dir: PathBuf,
}

impl PaysyncProcess {
    /// Starts `binary run --config <file>` with `toml` and extra environment; logs
    /// JSON at `info` to `paysync.log` unless `env` says otherwise.
    pub fn spawn(
        binary: &Path,
        toml: &str,
        http: SocketAddr,
        env: &[(&str, &str)],
    ) -> Result<PaysyncProcess, String> {
        let dir = std::env::temp_dir().join(format!(
            "paysync-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let config = dir.join("paysync.toml");
        std::fs::write(&config, toml).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.join("paysync.log")).map_err(|e| e.to_string())?;
        let child = Command::new(binary)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("PAYSYNC_LOG__FORMAT", "json")
            .env("PAYSYNC_LOG__LEVEL", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        Ok(PaysyncProcess { child, http, dir })
    }

    /// The settings file it runs with.
    pub fn config(&self) -> PathBuf {
        self.dir.join("paysync.toml")
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("paysync.log")).unwrap_or_default()
    }

    /// Sends a signal by name (`TERM`, `KILL`, ...).
    pub fn signal(&self, signal: &str) -> bool {
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Waits for the exit status, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// (peak RSS in MiB, CPU seconds) of the process, from `/proc` (Linux).
    pub fn usage(&self) -> (f64, f64) {
        proc_usage(self.child.id())
    }
}

impl Drop for PaysyncProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// (peak RSS in MiB, CPU seconds) of any process, from `/proc` (Linux).
pub fn proc_usage(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, r)| r.split(' ').collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 (1-based); after the comm field
    // they are 11 and 12 (0-based). Linux reports them in 1/100 s.
    (hwm_kb / 1024.0, (ticks(11) + ticks(12)) / 100.0)
}

/// "<cores> cores, <CPU model>" of this machine (benchmark reports).
pub fn cores_and_model() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|m| m.trim().to_owned())
        .unwrap_or_default();
    format!("{cores} cores, {model}")
}
