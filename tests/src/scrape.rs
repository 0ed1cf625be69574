//! Reading a daemon's `/metrics` (OpenMetrics text) into samples by series.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;

/// The content type both daemons serve `/metrics` with.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One scrape: every sample by its series (`name{labels}`).
#[derive(Clone, Debug)]
pub struct Scrape(pub HashMap<String, f64>);

impl Scrape {
    /// `GET {base_url}/metrics`, checked for status 200, the OpenMetrics content type and
    /// the final `# EOF`.
    pub fn get(base_url: &str) -> Result<Scrape> {
        let r = crate::registry_client::get(&format!("{base_url}/metrics"), &[])?;
        if r.status != 200 {
            bail!("GET {base_url}/metrics: status {}", r.status);
        }
        let content_type = r
            .headers
            .iter()
            .find(|(k, _)| k == "content-type")
            .map(|(_, v)| v.as_str());
        if content_type != Some(OPENMETRICS) {
            bail!("{base_url}/metrics: content type {content_type:?}");
        }
        let text = String::from_utf8(r.body).context("metrics are not UTF-8")?;
        Scrape::parse(&text)
    }

    /// Parses OpenMetrics text.
    pub fn parse(text: &str) -> Result<Scrape> {
        if !text.ends_with("# EOF\n") {
            bail!("metrics do not end with # EOF:\n{text}");
        }
        let mut samples = HashMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line
                .rsplit_once(' ')
                .with_context(|| format!("not a `series value` line: {line}"))?;
            let value = value
                .parse()
                .with_context(|| format!("not a number: {line}"))?;
            samples.insert(series.to_string(), value);
        }
        Ok(Scrape(samples))
    }

    /// The sample of `series`, or 0 if the series does not exist (yet).
    pub fn v(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }

    /// How much `series` grew since `before`.
    pub fn delta(&self, before: &Scrape, series: &str) -> f64 {
        self.v(series) - before.v(series)
    }
}
