//! Splits GNU `as` source into statements and parses each one into labels, a directive, an
//! assignment or an instruction (prefixes, mnemonic, operands).
//!
//! What `as` treats specially and this lexer therefore tracks: `#` comments to the end of the
//! line, `/* */` comments (which may span lines), `"..."` strings (which may contain `;` and
//! `#`), `'c` character constants, and `;` and newline as statement separators. Comments are
//! dropped from the statement text, except that a comment reading exactly `vsmp-marker` tags
//! its statement (that is how an inserted marker is recognised again).

use super::PatchError;

/// The comment text that tags an inserted marker.
pub const MARKER_TAG: &str = "vsmp-marker";

/// One statement's code, comments removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// 1-based line of the statement's first code byte.
    pub line: usize,
    /// The code, comments replaced by a space.
    pub text: String,
    /// For every byte of `text`, its offset in the source.
    pub offsets: Vec<usize>,
    /// A `vsmp-marker` comment belongs to this statement.
    pub tagged: bool,
}

/// Splits `source` into non-blank statements.
pub fn statements(source: &str) -> Result<Vec<Statement>, PatchError> {
    let bytes = source.as_bytes();
    let mut out = Vec::new();
    let mut cur = Builder::default();
    let mut line = 1usize;
    let mut i = 0usize;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'\n' => {
                cur.finish(&mut out);
                line += 1;
                i += 1;
            }
            b';' => {
                cur.finish(&mut out);
                i += 1;
            }
            b'#' => {
                let end = bytes[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(bytes.len(), |p| i + p);
                cur.comment(&source[i + 1..end]);
                i = end;
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let body_start = i + 2;
                let Some(len) = source[body_start..].find("*/") else {
                    return Err(PatchError::UnterminatedComment { line });
                };
                let body = &source[body_start..body_start + len];
                cur.comment(body);
                cur.push(b' ', i, line);
                line += body.bytes().filter(|&c| c == b'\n').count();
                i = body_start + len + 2;
            }
            b'"' => {
                let start_line = line;
                cur.push(b, i, line);
                i += 1;
                loop {
                    match bytes.get(i) {
                        None | Some(b'\n') => {
                            return Err(PatchError::UnterminatedString { line: start_line });
                        }
                        Some(b'\\') => {
                            cur.push(b'\\', i, line);
                            if let Some(&next) = bytes.get(i + 1).filter(|&&c| c != b'\n') {
                                cur.push(next, i + 1, line);
                                i += 2;
                            } else {
                                i += 1;
                            }
                        }
                        Some(&b'"') => {
                            cur.push(b'"', i, line);
                            i += 1;
                            break;
                        }
                        Some(&c) => {
                            cur.push(c, i, line);
                            i += 1;
                        }
                    }
                }
            }
            b'\'' => {
                // A character constant: `'c`, `'\n`, optionally closed by another quote.
                cur.push(b, i, line);
                i += 1;
                let mut take = match bytes.get(i) {
                    Some(b'\\') => 2,
                    Some(b'\n') | None => 0,
                    Some(_) => 1,
                };
                while take > 0 && i < bytes.len() && bytes[i] != b'\n' {
                    cur.push(bytes[i], i, line);
                    i += 1;
                    take -= 1;
                }
                if bytes.get(i) == Some(&b'\'') {
                    cur.push(b'\'', i, line);
                    i += 1;
                }
            }
            _ => {
                cur.push(b, i, line);
                i += 1;
            }
        }
    }
    cur.finish(&mut out);
    Ok(out)
}

#[derive(Debug, Default)]
struct Builder {
    text: Vec<u8>,
    offsets: Vec<usize>,
    line: Option<usize>,
    tagged: bool,
}

impl Builder {
    fn push(&mut self, b: u8, offset: usize, line: usize) {
        if self.line.is_none() && !b.is_ascii_whitespace() {
            self.line = Some(line);
        }
        self.text.push(b);
        self.offsets.push(offset);
    }

    fn comment(&mut self, body: &str) {
        if body.trim() == MARKER_TAG {
            self.tagged = true;
        }
    }

    fn finish(&mut self, out: &mut Vec<Statement>) {
        let builder = std::mem::take(self);
        let Some(line) = builder.line else { return };
        // Only whole UTF-8 sequences are copied (delimiters are ASCII), so this cannot fail.
        let text = String::from_utf8_lossy(&builder.text).into_owned();
        out.push(Statement {
            line,
            text,
            offsets: builder.offsets,
            tagged: builder.tagged,
        });
    }
}

/// What one statement holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// Labels defined at its start (`foo:`, `1:`).
    pub labels: Vec<String>,
    pub body: Body,
}

/// The statement after its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Nothing (the statement held only labels).
    Empty,
    /// `.name ...`: passed through untouched. `args` is the text after the name, trimmed.
    Directive { name: String, args: String },
    /// `symbol = expression`.
    Assignment,
    /// Prefixes and an optional mnemonic (none: a prefix-only statement such as `lock`).
    Instruction {
        /// Source offset of the first prefix or of the mnemonic: where a marker goes.
        offset: usize,
        prefixes: Vec<String>,
        mnemonic: Option<String>,
        operands: Vec<String>,
    },
}

fn is_symbol_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'$')
}

fn is_word_byte(b: u8) -> bool {
    is_symbol_byte(b) || matches!(b, b'\\' | b'@' | b'{' | b'}')
}

/// Parses a statement's text.
pub fn parse(stmt: &Statement) -> Parsed {
    let text = stmt.text.as_bytes();
    let mut pos = skip_space(text, 0);
    let mut labels = Vec::new();
    while let Some((label, next)) = label_at(text, pos) {
        labels.push(label);
        pos = skip_space(text, next);
    }
    if pos >= text.len() {
        return Parsed {
            labels,
            body: Body::Empty,
        };
    }
    let (first, after_first) = word_at(text, pos);
    if first.starts_with('.') && first.len() > 1 {
        let name = first.to_ascii_lowercase();
        let args = stmt.text[after_first..].trim().to_string();
        return Parsed {
            labels,
            body: Body::Directive { name, args },
        };
    }
    let eq = skip_space(text, after_first);
    if !first.is_empty() && text.get(eq) == Some(&b'=') && text.get(eq + 1) != Some(&b'=') {
        return Parsed {
            labels,
            body: Body::Assignment,
        };
    }
    let offset = stmt.offsets[pos];
    let mut prefixes = Vec::new();
    let mut mnemonic = None;
    let mut cursor = pos;
    loop {
        cursor = skip_space(text, cursor);
        let (word, next) = word_at(text, cursor);
        if word.is_empty() {
            break;
        }
        let lower = word.to_ascii_lowercase();
        cursor = next;
        if super::table::is_prefix(&lower) {
            prefixes.push(lower);
        } else {
            mnemonic = Some(lower);
            break;
        }
    }
    let operands = if mnemonic.is_some() {
        split_operands(&stmt.text[cursor..])
    } else {
        Vec::new()
    };
    Parsed {
        labels,
        body: Body::Instruction {
            offset,
            prefixes,
            mnemonic,
            operands,
        },
    }
}

fn skip_space(text: &[u8], mut pos: usize) -> usize {
    while pos < text.len() && text[pos].is_ascii_whitespace() {
        pos += 1;
    }
    pos
}

fn word_at(text: &[u8], pos: usize) -> (String, usize) {
    let mut end = pos;
    while end < text.len() && is_word_byte(text[end]) {
        end += 1;
    }
    (String::from_utf8_lossy(&text[pos..end]).into_owned(), end)
}

/// A label at `pos`: a symbol (or a quoted name) immediately followed by `:`.
fn label_at(text: &[u8], pos: usize) -> Option<(String, usize)> {
    let end = if text.get(pos) == Some(&b'"') {
        let close = text[pos + 1..].iter().position(|&b| b == b'"')?;
        pos + 1 + close + 1
    } else {
        let mut end = pos;
        while end < text.len()
            && (is_symbol_byte(text[end]) || text[end] == b'\\' || text[end] == b'@')
        {
            end += 1;
        }
        end
    };
    (end > pos && text.get(end) == Some(&b':')).then(|| {
        (
            String::from_utf8_lossy(&text[pos..end]).into_owned(),
            end + 1,
        )
    })
}

/// Splits operands at commas outside parentheses, trimming each.
fn split_operands(rest: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    let mut in_string = false;
    for (i, c) in rest.char_indices() {
        match c {
            '"' => in_string = !in_string,
            '(' if !in_string => depth += 1,
            ')' if !in_string => depth -= 1,
            ',' if !in_string && depth <= 0 => {
                out.push(rest[start..i].trim().to_string());
                start = i + 1;
            }
            _ => {}
        }
    }
    let last = rest[start..].trim();
    if !last.is_empty() || !out.is_empty() {
        out.push(last.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(src: &str) -> Vec<String> {
        statements(src)
            .unwrap()
            .into_iter()
            .map(|s| s.text.trim().to_string())
            .collect()
    }

    #[test]
    fn semicolons_and_newlines_separate_statements() {
        assert_eq!(texts("cli; hlt\n  nop\n\n"), ["cli", "hlt", "nop"]);
    }

    #[test]
    fn comments_are_dropped_and_strings_kept_whole() {
        assert_eq!(
            texts(".string \"a;b#c\" # hlt\n/* cli;\n sti */ nop"),
            [".string \"a;b#c\"", "nop"]
        );
    }

    #[test]
    fn statement_lines_count_newlines_inside_block_comments() {
        let stmts = statements("/* a\nb\n*/ hlt\ncli").unwrap();
        assert_eq!(stmts.iter().map(|s| s.line).collect::<Vec<_>>(), [3, 4]);
    }

    #[test]
    fn a_marker_tag_comment_tags_its_statement_only() {
        let stmts =
            statements("ud2 /* vsmp-marker */; hlt\nud2 # vsmp-marker\nud2 # other").unwrap();
        assert_eq!(
            stmts.iter().map(|s| s.tagged).collect::<Vec<_>>(),
            [true, false, true, false]
        );
    }

    #[test]
    fn character_constants_may_hold_separators() {
        assert_eq!(texts("movb $';, %al; nop"), ["movb $';, %al", "nop"]);
    }

    #[test]
    fn an_unterminated_comment_or_string_is_an_error_with_its_line() {
        assert_eq!(
            statements("nop\n/* open\n").unwrap_err(),
            PatchError::UnterminatedComment { line: 2 }
        );
        assert_eq!(
            statements("nop\nnop\n.ascii \"abc\n").unwrap_err(),
            PatchError::UnterminatedString { line: 3 }
        );
    }

    fn parse_one(src: &str) -> Parsed {
        parse(&statements(src).unwrap()[0])
    }

    #[test]
    fn labels_prefixes_mnemonic_and_operands_are_separated() {
        let p = parse_one("foo: 1: lock addl $1, 8(%rax,%rbx,4)");
        assert_eq!(p.labels, ["foo", "1"]);
        let Body::Instruction {
            offset,
            prefixes,
            mnemonic,
            operands,
        } = p.body
        else {
            panic!("not an instruction")
        };
        assert_eq!(offset, 8);
        assert_eq!(prefixes, ["lock"]);
        assert_eq!(mnemonic.as_deref(), Some("addl"));
        assert_eq!(operands, ["$1", "8(%rax,%rbx,4)"]);
    }

    #[test]
    fn directives_assignments_and_label_only_statements_are_told_apart() {
        assert_eq!(parse_one(".L2:").body, Body::Empty);
        assert_eq!(
            parse_one("\t.string \"hlt\"").body,
            Body::Directive {
                name: ".string".into(),
                args: "\"hlt\"".into()
            }
        );
        assert_eq!(parse_one("str = 4").body, Body::Assignment);
        assert!(matches!(
            parse_one("str: .long 0").body,
            Body::Directive { .. }
        ));
    }

    #[test]
    fn a_segment_override_in_an_operand_is_not_a_label() {
        let p = parse_one("movq %fs:0, %rax");
        assert!(p.labels.is_empty());
        assert!(matches!(p.body, Body::Instruction { mnemonic: Some(ref m), .. } if m == "movq"));
    }
}
