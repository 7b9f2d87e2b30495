//! A run's report: what the bench prints as it goes, and the same in markdown for the page that
//! `--markdown` writes. A section's method (what it measures, what its columns mean) is on the
//! page only; the run's own lines (tables, notes, profiles, goals) are printed and on the page.
//!
//! Shared with `aviary-policy-bench`, which writes its section the same way.

/// The report of one run, in markdown, built as the sections print.
#[derive(Debug, Default)]
pub struct Report {
    markdown: String,
    /// Whether the last block was a note: the notes that follow it join its list.
    in_notes: bool,
}

impl Report {
    /// Starts a section of the page: its title, and what it measures.
    pub fn section(&mut self, title: &str, method: &str) {
        self.page_block(&format!("## {title}"));
        if !method.is_empty() {
            self.page_block(method.trim_end());
        }
    }

    /// A paragraph: what this run did, in words.
    pub fn text(&mut self, text: &str) {
        self.block(text, text, false);
    }

    pub fn table(&mut self, table: &Table) {
        let rendered = table.render();
        self.block(&rendered, &rendered, false);
    }

    /// A line of its own (a figure, a failure); notes in a row make one list on the page.
    pub fn note(&mut self, line: &str) {
        self.block(line, &format!("- {}", one_line(line)), true);
    }

    /// Preformatted lines (a profile, the goals), as they were printed.
    pub fn code(&mut self, text: &str) {
        let text = text.trim_end();
        self.block(text, &format!("```\n{text}\n```"), false);
    }

    /// The page's body so far.
    pub fn markdown(&self) -> &str {
        &self.markdown
    }

    /// Prints `printed` and adds `markdown` to the page, each after a blank line unless it
    /// continues a list of notes.
    fn block(&mut self, printed: &str, markdown: &str, note: bool) {
        let continues = note && self.in_notes;
        if !continues {
            println!();
        }
        println!("{printed}");
        self.push(markdown, continues);
        self.in_notes = note;
    }

    fn page_block(&mut self, markdown: &str) {
        self.push(markdown, false);
        self.in_notes = false;
    }

    fn push(&mut self, markdown: &str, continues: bool) {
        if !continues && !self.markdown.is_empty() {
            self.markdown.push('\n');
        }
        self.markdown.push_str(markdown);
        self.markdown.push('\n');
    }
}

/// A table, printed and written as markdown.
#[derive(Debug)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<S: Into<String>>(header: impl IntoIterator<Item = S>) -> Self {
        Self {
            header: header.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// A row: its name, then a cell per column.
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    /// The table in markdown, one line per row. A cell's text stays in its cell: line breaks
    /// become spaces and `|` is escaped.
    pub fn render(&self) -> String {
        let line = |cells: &[String]| {
            let cells: Vec<String> = cells
                .iter()
                .map(|c| one_line(c).replace('|', "\\|"))
                .collect();
            format!("| {} |", cells.join(" | "))
        };
        let mut lines = vec![
            line(&self.header),
            format!("|{}", "---|".repeat(self.header.len())),
        ];
        lines.extend(self.rows.iter().map(|row| line(row)));
        lines.join("\n")
    }
}

/// `text` on one line: an error's lines joined by spaces.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_markdown_table() {
        let mut table = Table::new(["shape", "direct", "Aviary"]);
        table.row(["keep-alive, throughput", "100 req/s", "50 req/s (0.50x)"]);
        table.row(["errors", "0", "failed: a | b\nc"]);
        assert_eq!(
            table.render(),
            "| shape | direct | Aviary |\n\
             |---|---|---|\n\
             | keep-alive, throughput | 100 req/s | 50 req/s (0.50x) |\n\
             | errors | 0 | failed: a \\| b c |"
        );
    }

    #[test]
    fn writes_sections_notes_and_code_as_markdown() {
        let mut report = Report::default();
        report.section("L4", "What it measures.\n");
        report.text("This run: 1 s each.");
        let mut table = Table::new(["shape", "direct"]);
        table.row(["bulk", "1 MB/s"]);
        report.table(&table);
        report.note("first");
        report.note("second\n  line");
        report.code("PASS  a goal\n");
        report.section("Goals", "");
        assert_eq!(
            report.markdown(),
            "## L4\n\nWhat it measures.\n\nThis run: 1 s each.\n\n\
             | shape | direct |\n|---|---|\n| bulk | 1 MB/s |\n\n\
             - first\n- second line\n\n```\nPASS  a goal\n```\n\n## Goals\n"
        );
    }
}
