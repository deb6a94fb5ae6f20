//! Results: metrics per round, their aggregation over rounds, the table and the JSON.

use serde_json::{json, Map, Value};

use crate::util::{fmt_num, median};

/// How a metric's per-round values are combined.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Agg {
    Median,
    /// Counters that must add up (errors, lost events).
    Sum,
    /// Worst case over rounds (max latency).
    Max,
}

/// A target the value must reach.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Goal {
    None,
    AtLeast(f64),
    AtMost(f64),
}

impl Goal {
    fn met(self, v: f64) -> Option<bool> {
        match self {
            Goal::None => None,
            Goal::AtLeast(g) => Some(v >= g),
            Goal::AtMost(g) => Some(v <= g),
        }
    }
    fn describe(self) -> String {
        match self {
            Goal::None => String::new(),
            Goal::AtLeast(g) => format!(">= {}", fmt_num(g)),
            Goal::AtMost(g) => format!("<= {}", fmt_num(g)),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Metric {
    /// Machine name, e.g. `requests_per_sec`.
    pub key: &'static str,
    /// Table label, e.g. `requests/s`.
    pub label: &'static str,
    pub value: f64,
    pub agg: Agg,
    pub goal: Goal,
    /// A correctness check (lost events, seq holes, errors): failing it fails the run.
    /// Otherwise the goal is a performance budget, reported but not enforced.
    pub check: bool,
}

impl Metric {
    pub fn new(key: &'static str, label: &'static str, value: f64) -> Metric {
        Metric {
            key,
            label,
            value,
            agg: Agg::Median,
            goal: Goal::None,
            check: false,
        }
    }
    pub fn budget(mut self, goal: Goal, enabled: bool) -> Metric {
        if enabled {
            self.goal = goal;
        }
        self
    }
    /// A counter that must be zero.
    pub fn must_be_zero(mut self) -> Metric {
        self.agg = Agg::Sum;
        self.goal = Goal::AtMost(0.0);
        self.check = true;
        self
    }
    pub fn agg(mut self, agg: Agg) -> Metric {
        self.agg = agg;
        self
    }
}

pub struct ScenarioReport {
    pub name: &'static str,
    pub params: Value,
    pub rounds: Vec<Vec<Metric>>,
    /// Facts worth knowing that are not numbers (server exit status, warnings).
    pub notes: Vec<String>,
    pub error: Option<String>,
}

pub struct Summary {
    pub metric: Metric,
    pub per_round: Vec<f64>,
}

impl ScenarioReport {
    pub fn new(name: &'static str, params: Value) -> ScenarioReport {
        ScenarioReport {
            name,
            params,
            rounds: Vec::new(),
            notes: Vec::new(),
            error: None,
        }
    }

    pub fn summary(&self) -> Vec<Summary> {
        let mut out: Vec<Summary> = Vec::new();
        for round in &self.rounds {
            for m in round {
                match out.iter_mut().find(|s| s.metric.key == m.key) {
                    Some(s) => s.per_round.push(m.value),
                    None => out.push(Summary {
                        metric: m.clone(),
                        per_round: vec![m.value],
                    }),
                }
            }
        }
        for s in &mut out {
            s.metric.value = match s.metric.agg {
                Agg::Median => median(&s.per_round),
                Agg::Sum => s.per_round.iter().sum(),
                Agg::Max => s.per_round.iter().copied().fold(f64::NAN, f64::max),
            };
        }
        out
    }

    /// False when a correctness check failed or the scenario errored.
    pub fn ok(&self) -> bool {
        self.error.is_none()
            && self
                .summary()
                .iter()
                .all(|s| !s.metric.check || s.metric.goal.met(s.metric.value) != Some(false))
    }
}

fn status(m: &Metric) -> &'static str {
    match (m.goal.met(m.value), m.check) {
        (None, _) => "",
        (Some(true), _) => "ok",
        (Some(false), true) => "FAIL",
        (Some(false), false) => "MISS",
    }
}

fn agg_label(a: Agg) -> &'static str {
    match a {
        Agg::Median => "median",
        Agg::Sum => "sum",
        Agg::Max => "max",
    }
}

pub fn table(reports: &[ScenarioReport]) -> String {
    let mut rows: Vec<[String; 6]> = vec![[
        "scenario".into(),
        "metric".into(),
        "value".into(),
        "budget".into(),
        "status".into(),
        "rounds".into(),
    ]];
    for r in reports {
        for s in r.summary() {
            let m = &s.metric;
            let value = if m.agg == Agg::Median || s.per_round.len() < 2 {
                fmt_num(m.value)
            } else {
                format!("{} ({})", fmt_num(m.value), agg_label(m.agg))
            };
            let rounds = if s.per_round.len() > 1 {
                s.per_round
                    .iter()
                    .map(|v| fmt_num(*v))
                    .collect::<Vec<_>>()
                    .join(" | ")
            } else {
                String::new()
            };
            rows.push([
                r.name.into(),
                m.label.into(),
                value,
                m.goal.describe(),
                status(m).into(),
                rounds,
            ]);
        }
        if r.error.is_some() {
            rows.push([
                r.name.into(),
                "error (see notes)".into(),
                "-".into(),
                String::new(),
                "FAIL".into(),
                String::new(),
            ]);
        }
    }
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let mut line = String::new();
        for (j, cell) in row.iter().enumerate() {
            let pad = widths[j] - cell.chars().count();
            if j == 2 {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if j + 1 < row.len() {
                    line.push_str(&" ".repeat(pad));
                }
            }
            if j + 1 < row.len() {
                line.push_str("  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
        if i == 0 {
            let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
            out.push_str(&"-".repeat(total.min(120)));
            out.push('\n');
        }
    }
    let notes: Vec<String> = reports
        .iter()
        .flat_map(|r| {
            let error = r
                .error
                .as_ref()
                .map(|e| format!("  {}: ERROR: {}", r.name, e.lines().next().unwrap_or("")));
            error
                .into_iter()
                .chain(r.notes.iter().map(move |n| format!("  {}: {n}", r.name)))
        })
        .collect();
    if !notes.is_empty() {
        out.push_str("notes:\n");
        for n in notes {
            out.push_str(&n);
            out.push('\n');
        }
    }
    out
}

fn num(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

pub fn to_json(reports: &[ScenarioReport], config: Value) -> Value {
    let scenarios: Vec<Value> = reports
        .iter()
        .map(|r| {
            let summary = r.summary();
            let mut values = Map::new();
            let mut goals = Map::new();
            for s in &summary {
                values.insert(s.metric.key.into(), num(s.metric.value));
                if s.metric.goal != Goal::None {
                    goals.insert(
                        s.metric.key.into(),
                        json!({
                            "goal": s.metric.goal.describe(),
                            "met": s.metric.goal.met(s.metric.value),
                            "correctness": s.metric.check,
                        }),
                    );
                }
            }
            let rounds: Vec<Value> = r
                .rounds
                .iter()
                .map(|round| {
                    Value::Object(round.iter().map(|m| (m.key.into(), num(m.value))).collect())
                })
                .collect();
            json!({
                "name": r.name,
                "params": r.params,
                "summary": values,
                "aggregation": summary.iter().map(|s| (s.metric.key.to_string(), json!(agg_label(s.metric.agg)))).collect::<Map<_, _>>(),
                "goals": goals,
                "rounds": rounds,
                "notes": r.notes,
                "error": r.error,
                "ok": r.ok(),
            })
        })
        .collect();
    json!({
        "tool": "ordersync-bench",
        "config": config,
        "scenarios": scenarios,
        "ok": reports.iter().all(|r| r.ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregation_and_checks() {
        let mut r = ScenarioReport::new("x", json!({}));
        for (rate, lost) in [(10.0, 0.0), (30.0, 0.0), (20.0, 1.0)] {
            r.rounds.push(vec![
                Metric::new("rate", "rate", rate).budget(Goal::AtLeast(15.0), true),
                Metric::new("lost", "lost", lost).must_be_zero(),
            ]);
        }
        let s = r.summary();
        assert_eq!(s[0].metric.value, 20.0);
        assert_eq!(s[1].metric.value, 1.0);
        assert!(!r.ok());
        let t = table(&[r]);
        assert!(t.contains("FAIL"), "{t}");
        assert!(t.contains("10 | 30 | 20"), "{t}");
    }
}
