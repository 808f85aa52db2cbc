//! A client of vde2 `wirefilter`'s management socket: a line console that greets with a
//! banner and a `VDEwf$ ` prompt, and answers each command with its output (between
//! `0000 DATA END WITH '.'` and a lone `.`), a status line (`1000 Success`, or another
//! code and the error), and the prompt again.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// What ends every answer.
const PROMPT: &str = "$ ";

#[derive(Debug, thiserror::Error)]
pub enum WirefilterError {
    #[error("Cannot talk to wirefilter at `{socket}`: {source}")]
    Io {
        socket: String,
        source: std::io::Error,
    },
    #[error("wirefilter refused `{command}`: {said}")]
    Refused { command: String, said: String },
}

/// One management session.
pub struct Wirefilter {
    stream: UnixStream,
    socket: String,
}

impl Wirefilter {
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self, WirefilterError> {
        let name = socket.display().to_string();
        let io = |source| WirefilterError::Io {
            socket: name.clone(),
            source,
        };
        let stream = UnixStream::connect(socket).map_err(io)?;
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        let mut session = Self {
            stream,
            socket: name,
        };
        session.read_answer()?;
        Ok(session)
    }

    /// Runs `command` (`delay 100`, `showinfo`); its output.
    pub fn command(&mut self, command: &str) -> Result<String, WirefilterError> {
        self.stream
            .write_all(format!("{command}\n").as_bytes())
            .map_err(|source| self.io(source))?;
        let answer = self.read_answer()?;
        parse_answer(&answer).map_err(|said| WirefilterError::Refused {
            command: command.to_string(),
            said,
        })
    }

    /// Everything up to and with the next prompt.
    fn read_answer(&mut self) -> Result<String, WirefilterError> {
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&answer).ends_with(PROMPT) {
            let n = self
                .stream
                .read(&mut buf)
                .map_err(|source| self.io(source))?;
            if n == 0 {
                return Err(self.io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            answer.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }

    fn io(&self, source: std::io::Error) -> WirefilterError {
        WirefilterError::Io {
            socket: self.socket.clone(),
            source,
        }
    }
}

/// The output of an answer whose status is `1000`; the status line otherwise.
pub(crate) fn parse_answer(answer: &str) -> Result<String, String> {
    let mut data = Vec::new();
    let mut in_data = false;
    for line in answer.lines() {
        if line.starts_with("0000 ") {
            in_data = true;
        } else if in_data && line == "." {
            in_data = false;
        } else if in_data {
            data.push(line);
        } else if let Some((code, rest)) = line.split_once(' ')
            && code.len() == 4
            && code.bytes().all(|b| b.is_ascii_digit())
        {
            return match code {
                "1000" => Ok(data.join("\n")),
                _ => Err(format!("{code} {rest}")),
            };
        }
    }
    Err(format!("no status in its answer: {answer:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_gives_its_data_or_its_error() {
        let ok = "0000 DATA END WITH '.'\nDelay  L->R 100+0U\n.\n1000 Success\n\nVDEwf$ ";
        assert_eq!(parse_answer(ok).unwrap(), "Delay  L->R 100+0U");
        assert_eq!(parse_answer("1000 Success\n\nVDEwf$ ").unwrap(), "");
        assert_eq!(
            parse_answer("1038 Function not implemented\n\nVDEwf$ ").unwrap_err(),
            "1038 Function not implemented"
        );
        assert!(parse_answer("VDEwf$ ").is_err());
    }
}
