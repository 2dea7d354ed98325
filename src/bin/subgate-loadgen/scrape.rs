//! Server cost from the servers themselves: each target's `/metrics`
//! (`subgate_process_cpu_seconds_total`, `subgate_process_resident_memory_bytes`),
//! scraped at every address its host name resolves to.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// One node's figures at one moment.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sample {
    pub cpu_seconds: f64,
    pub rss_bytes: f64,
    /// The node's peak RSS since it started (0 from a node that does not
    /// say).
    pub peak_rss_bytes: f64,
    pub delivered: f64,
    /// GraphQL subscription results executed so far.
    pub executions: f64,
}

/// The nodes to scrape, found once: a host name stands for every address
/// it resolves to (each replica of a compose service).
pub struct Targets {
    client: reqwest::Client,
    /// (label, URL to fetch, Host header).
    nodes: Vec<(String, String, String)>,
}

impl Targets {
    pub async fn resolve(urls: &[String]) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(SCRAPE_TIMEOUT)
            .build()
            .map_err(|e| format!("an HTTP client: {e}"))?;
        let mut nodes = Vec::new();
        for url in urls {
            let authority = url
                .strip_prefix("http://")
                .and_then(|r| r.split('/').next())
                .ok_or_else(|| format!("--metrics-url {url}: expected http://host:port"))?;
            let with_port = if authority.contains(':') {
                authority.to_owned()
            } else {
                format!("{authority}:80")
            };
            let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host(&with_port)
                .await
                .map_err(|e| format!("--metrics-url {url}: {e}"))?
                .collect();
            addrs.sort();
            addrs.dedup();
            // "localhost" resolves to both loopbacks: one node, not two.
            if addrs.len() > 1 && addrs.iter().all(|a| a.ip().is_loopback()) {
                addrs.truncate(1);
            }
            for addr in addrs {
                let label = if addr.to_string() == with_port {
                    url.clone()
                } else {
                    format!("{url} ({addr})")
                };
                nodes.push((
                    label,
                    format!("http://{addr}/metrics"),
                    authority.to_owned(),
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        nodes.retain(|(_, u, _)| seen.insert(u.clone()));
        Ok(Self { client, nodes })
    }

    pub fn labels(&self) -> Vec<String> {
        self.nodes.iter().map(|(l, _, _)| l.clone()).collect()
    }

    /// Scrapes every node; a node that does not answer is `None`.
    pub async fn sample(&self) -> Vec<Option<Sample>> {
        let scrapes = self.nodes.iter().map(|(_, url, host)| async move {
            let body = self
                .client
                .get(url)
                .header("host", host)
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            parse(&body)
        });
        futures_util::future::join_all(scrapes).await
    }
}

/// Reads the figures out of a Prometheus text exposition.
pub fn parse(text: &str) -> Option<Sample> {
    let mut sample = Sample::default();
    let mut found = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((name_labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = name_labels.split('{').next().unwrap_or(name_labels);
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        match name {
            "subgate_process_cpu_seconds_total" => sample.cpu_seconds = value,
            "subgate_process_resident_memory_bytes" => sample.rss_bytes = value,
            "subgate_process_resident_memory_max_bytes" => sample.peak_rss_bytes = value,
            "subgate_events_delivered_total" => sample.delivered += value,
            "subgate_graphql_subscription_executions_total" => sample.executions = value,
            _ => continue,
        }
        found.insert(name.to_owned(), ());
    }
    found
        .contains_key("subgate_process_resident_memory_bytes")
        .then_some(sample)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_figures_are_read_and_deliveries_summed() {
        let text = "# HELP x\nsubgate_process_cpu_seconds_total 12.5\nsubgate_process_resident_memory_bytes 3.2e7\nsubgate_process_resident_memory_max_bytes 4e7\nsubgate_events_delivered_total{transport=\"sse\"} 3\nsubgate_events_delivered_total{transport=\"graphql_ws\"} 4\nsubgate_graphql_subscription_executions_total 9\n";
        let s = parse(text).unwrap();
        assert_eq!(s.cpu_seconds, 12.5);
        assert_eq!(s.rss_bytes, 3.2e7);
        assert_eq!(s.peak_rss_bytes, 4e7);
        assert_eq!(s.delivered, 7.0);
        assert_eq!(s.executions, 9.0);
        assert!(parse("not metrics").is_none());
    }
}
