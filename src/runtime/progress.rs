//! What a pull shows while it runs. On a terminal (stderr): a bar per layer and an overall bar
//! per image, every concurrent pull on one board (indicatif). Elsewhere (logs, CI): one line
//! per image when it is done, saying how much came from the registry.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The one board every pull of this process draws on, when stderr is a terminal.
fn board() -> Option<&'static MultiProgress> {
    static BOARD: OnceLock<Option<MultiProgress>> = OnceLock::new();
    BOARD
        .get_or_init(|| {
            std::io::stderr()
                .is_terminal()
                .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
        })
        .as_ref()
}

/// A bar on `board` drawn as `template`, named `prefix`.
fn bar_on(board: &MultiProgress, template: &str, prefix: &str) -> ProgressBar {
    let bar = board.add(ProgressBar::new(0));
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(prefix.to_string());
    bar
}

/// One layer as the engine reports it.
#[derive(Default)]
struct Layer {
    current: u64,
    total: u64,
    /// The engine had it already ("Already exists").
    present: bool,
    bar: Option<ProgressBar>,
}

/// The progress of one image's pull.
pub struct Pull {
    reference: String,
    started: Instant,
    layers: BTreeMap<String, Layer>,
    overall: Option<ProgressBar>,
}

/// The engine's statuses that are about one layer (its `id` is the layer's short digest).
const LAYER_STATUSES: [&str; 8] = [
    "Pulling fs layer",
    "Waiting",
    "Downloading",
    "Verifying Checksum",
    "Download complete",
    "Extracting",
    "Pull complete",
    "Already exists",
];

impl Pull {
    pub fn start(reference: &str) -> Pull {
        let overall = board().map(|b| {
            bar_on(
                b,
                "{prefix} {wide_bar} {binary_bytes}/{binary_total_bytes} {elapsed}",
                reference,
            )
        });
        Pull {
            reference: reference.to_string(),
            started: Instant::now(),
            layers: BTreeMap::new(),
            overall,
        }
    }

    /// One message of the engine's pull stream.
    pub fn update(
        &mut self,
        id: Option<&str>,
        status: &str,
        current: Option<i64>,
        total: Option<i64>,
    ) {
        let (Some(id), true) = (id, LAYER_STATUSES.contains(&status)) else {
            return;
        };
        let overall = self.overall.clone();
        let layer = self.layers.entry(id.to_string()).or_insert_with(|| Layer {
            bar: overall.as_ref().and(board()).map(|b| {
                bar_on(
                    b,
                    "  {prefix} {bar:30} {binary_bytes}/{binary_total_bytes} {msg}",
                    id,
                )
            }),
            ..Layer::default()
        });
        match status {
            "Downloading" => {
                layer.current = current.unwrap_or(0).max(0) as u64;
                layer.total = total.unwrap_or(0).max(0) as u64;
            }
            "Download complete" | "Pull complete" | "Extracting" => layer.current = layer.total,
            "Already exists" => layer.present = true,
            _ => {}
        }
        if let Some(bar) = &layer.bar {
            bar.set_length(layer.total);
            bar.set_position(layer.current);
            bar.set_message(status.to_string());
        }
        if let Some(bar) = &self.overall {
            bar.set_length(self.layers.values().map(|l| l.total).sum());
            bar.set_position(self.layers.values().map(|l| l.current).sum());
        }
    }

    /// What the pull fetched, in one line: `pulled <image>: 3 layers (1 already here), 12.4 MB in 1.3 s`.
    pub fn summary(&self) -> String {
        let fetched: u64 = self.layers.values().map(|l| l.total).sum();
        let present = self.layers.values().filter(|l| l.present).count();
        format!(
            "pulled {}: {} layer{}{}, {:.1} MB in {:.1} s",
            self.reference,
            self.layers.len(),
            if self.layers.len() == 1 { "" } else { "s" },
            if present > 0 {
                format!(" ({present} already here)")
            } else {
                String::new()
            },
            fetched as f64 / 1e6,
            self.started.elapsed().as_secs_f64()
        )
    }

    /// Ends the pull's display: the bars give way to the summary line (on the board when there
    /// is one, so it is not drawn over), or the line is printed on stdout.
    pub fn finish(self) {
        let line = self.summary();
        self.clear();
        match board() {
            Some(b) if self.overall.is_some() => {
                let _ = b.println(&line);
            }
            _ => println!("{line}"),
        }
    }

    /// Ends the display of a pull that failed: its bars go, the error says the rest.
    pub fn abandon(self) {
        self.clear();
    }

    /// Takes every bar of this pull off the board.
    fn clear(&self) {
        let bars = self.layers.values().filter_map(|l| l.bar.as_ref());
        for bar in bars.chain(self.overall.as_ref()) {
            bar.finish_and_clear();
            if let Some(b) = board() {
                b.remove(bar);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_counts_layers_fetched_and_already_here() {
        let mut p = Pull::start("registry.example/notes:1.4");
        p.update(Some("1.4"), "Pulling from notes", None, None);
        p.update(Some("aaaa"), "Pulling fs layer", None, None);
        p.update(Some("bbbb"), "Already exists", None, None);
        p.update(
            Some("aaaa"),
            "Downloading",
            Some(1_000_000),
            Some(2_500_000),
        );
        p.update(Some("aaaa"), "Download complete", None, None);
        p.update(Some("aaaa"), "Pull complete", None, None);
        p.update(None, "Digest: sha256:00", None, None);
        let line = p.summary();
        assert!(
            line.starts_with(
                "pulled registry.example/notes:1.4: 2 layers (1 already here), 2.5 MB in "
            ),
            "{line}"
        );
    }
}
