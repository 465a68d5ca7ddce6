//! The pool follows the machine: a scripted fake machine (battery, temperature) drives the real
//! control loop, policy and pool of real workers on the tiny fixture. Its own test binary, because
//! power-saver limits the CPU cores of the whole process.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidepool_control::policy::PolicyConfig;
use tidepool_control::power::{ModeCaps, PowerConfig};
use tidepool_tests::{get_json, start_server, tiny_fixture, ServerOptions, TestServer};

async fn status(s: &TestServer) -> Value {
    get_json(s.url("/admin/status")).await.1
}

fn ready(v: &Value) -> usize {
    v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] == "ready")
        .count()
}

/// Polls /admin/status until `cond` holds, or fails with the last status after `secs`.
async fn wait_until(s: &TestServer, what: &str, secs: f64, cond: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let v = status(s).await;
        if cond(&v) {
            return v;
        }
        assert!(
            started.elapsed().as_secs_f64() < secs,
            "{what}: not within {secs} s; status: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn chat(s: &TestServer, priority: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .header("x-tidepool-priority", priority)
        .json(&json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn battery_and_heat_drive_the_pool() {
    // Ticks every 200 ms; "within one tick" is checked with room for a loaded CI machine.
    const TICK: f64 = 0.2;
    const SLACK: f64 = 1.5;
    // Before any limit: available_parallelism follows the affinity the limit sets.
    let cores = std::thread::available_parallelism().unwrap().get();
    let s = start_server(ServerOptions {
        model: Some(tiny_fixture()),
        slots: 2,
        pool: Some((8, Duration::from_secs(10))),
        policy: Some(PolicyConfig {
            min_workers: 2,
            max_workers: 2,
            ..PolicyConfig::default()
        }),
        power: PowerConfig {
            balanced: ModeCaps {
                max_workers: Some(1),
                slots_per_worker: None,
                cpu_threads: None,
            },
            ..PowerConfig::for_cores(4)
        },
        ..Default::default()
    });
    s.machine.set_battery(true, 60.0);
    let v = wait_until(&s, "two workers on AC", 30.0, |v| ready(v) == 2).await;
    assert_eq!(v["power"]["effective"], "performance", "{v:#}");

    // Unplugged at 60 %: balanced caps the pool at one worker within a tick.
    s.machine.set_battery(false, 60.0);
    let v = wait_until(&s, "balanced on battery", TICK + SLACK, |v| {
        v["power"]["effective"] == "balanced" && v["decision"]["workers"] == 1
    })
    .await;
    let reason = v["decision"]["reason"].as_str().unwrap();
    assert!(reason.contains("on battery at 60 %"), "{reason}");
    wait_until(&s, "drained to one", 10.0, |v| ready(v) == 1).await;

    // Drained to 15 %: power-saver, one slot per worker and one CPU core.
    s.machine.set_battery(false, 15.0);
    let v = wait_until(&s, "power-saver below 20 %", TICK + SLACK, |v| {
        v["power"]["effective"] == "power-saver"
    })
    .await;
    assert_eq!(v["power"]["slots_per_worker"], 1, "{v:#}");
    let w = wait_until(&s, "one slot admitted", TICK + SLACK, |v| {
        v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["slots_total"] == 1)
    })
    .await;
    assert_eq!(w["cpu_cores_in_use"], 1, "{w:#}");
    let r = chat(&s, "standard").await;
    assert_eq!(r.status(), 200, "still serving in power-saver");

    // Plugged in: every cap lifted.
    s.machine.set_battery(true, 16.0);
    let v = wait_until(&s, "caps lifted on AC", 10.0, |v| {
        v["power"]["effective"] == "performance" && ready(v) == 2
    })
    .await;
    assert_eq!(v["cpu_cores_in_use"], cores, "{v:#}");
    assert!(v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|w| w["slots_total"] == 2));

    // A spike past critical: shed to one worker and refuse the batch class.
    s.machine.set_celsius(97.0);
    let v = wait_until(&s, "shedding", TICK + SLACK, |v| {
        v["power"]["thermal"] == "critical" && v["decision"]["workers"] == 1
    })
    .await;
    assert!(
        v["decision"]["reason"].as_str().unwrap().contains("97 °C"),
        "{v:#}"
    );
    wait_until(&s, "shed to one worker", 10.0, |v| ready(v) == 1).await;
    let r = chat(&s, "batch").await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "30");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "shedding_load", "{body}");
    assert_eq!(chat(&s, "interactive").await.status(), 200);
    assert_eq!(chat(&s, "standard").await.status(), 200);

    // Cooling inside the hysteresis band changes nothing.
    s.machine.set_celsius(92.0);
    tokio::time::sleep(Duration::from_secs_f64(4.0 * TICK)).await;
    let v = status(&s).await;
    assert_eq!(v["power"]["thermal"], "critical", "{v:#}");
    assert_eq!(chat(&s, "batch").await.status(), 503);
    // Below the band: warm, batch accepted again, but the pool does not grow yet.
    s.machine.set_celsius(88.0);
    let v = wait_until(&s, "warm", TICK + SLACK, |v| {
        v["power"]["thermal"] == "warm"
    })
    .await;
    assert!(
        v["decision"]["reason"]
            .as_str()
            .unwrap()
            .contains("not growing"),
        "{v:#}"
    );
    assert_eq!(chat(&s, "batch").await.status(), 200);
    tokio::time::sleep(Duration::from_secs_f64(4.0 * TICK)).await;
    assert_eq!(status(&s).await["decision"]["workers"], 1);
    // Cool: back to two.
    s.machine.set_celsius(60.0);
    wait_until(&s, "recovered", 10.0, |v| {
        v["power"]["thermal"] == "normal" && ready(v) == 2
    })
    .await;

    // The power config is live: a fixed power-saver mode applies on AC too.
    let r = reqwest::Client::new()
        .put(s.url("/admin/config"))
        .json(&json!({"power": {"mode": "power-saver"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_until(&s, "power-saver by config", TICK + SLACK, |v| {
        v["power"]["effective"] == "power-saver" && v["decision"]["workers"] == 1
    })
    .await;
    let r = reqwest::Client::new()
        .put(s.url("/admin/config"))
        .json(&json!({"power": {"mode": "turbo"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    s.stop(30);
}
