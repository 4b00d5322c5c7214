package fakeanthropic

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"strconv"
	"strings"
	"sync"
)

// PromptCount is what ByPrompt counted for one prompt.
type PromptCount struct {
	// Calls are the /v1/messages requests with this prompt.
	Calls int `json:"calls"`
	// Complete are the 200 answers sent whole (a stream up to its
	// message_stop, a JSON message to its last byte): answers the account
	// pays for in full.
	Complete int `json:"complete"`
}

// ByPrompt wraps a handler (a Server) and counts, per prompt (the text of
// the last user message), the /v1/messages calls and the complete 200
// answers. When a test gives every job its own prompt, a prompt answered in
// full twice is an answer bought twice.
//
// With a journal, each call and each complete answer is also written there
// as a line ("call\t<prompt>" or "complete\t<prompt>", the prompt quoted as
// Go quotes strings) before the answer's last bytes leave, so that the
// count survives the process being killed: ReadJournal reads it back.
//
// GET /_fake/by_prompt answers the counts as JSON, {"<prompt>": {"calls",
// "complete"}}; every other request goes to the wrapped handler.
type ByPrompt struct {
	next    http.Handler
	mu      sync.Mutex
	journal io.Writer
	counts  map[string]PromptCount
}

// CountByPrompt wraps next; journal may be nil.
func CountByPrompt(next http.Handler, journal io.Writer) *ByPrompt {
	return &ByPrompt{next: next, journal: journal, counts: map[string]PromptCount{}}
}

// Counts returns a copy of the counts so far.
func (b *ByPrompt) Counts() map[string]PromptCount {
	b.mu.Lock()
	defer b.mu.Unlock()
	return maps.Clone(b.counts)
}

func (b *ByPrompt) note(prompt string, complete bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	c := b.counts[prompt]
	kind := "call"
	if complete {
		c.Complete++
		kind = "complete"
	} else {
		c.Calls++
	}
	b.counts[prompt] = c
	if b.journal != nil {
		_, _ = fmt.Fprintf(b.journal, "%s\t%s\n", kind, strconv.Quote(prompt))
	}
}

// ServeHTTP counts /v1/messages calls and passes every request on.
func (b *ByPrompt) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodGet && r.URL.Path == "/_fake/by_prompt" {
		writeJSON(w, http.StatusOK, b.Counts())
		return
	}
	if r.Method != http.MethodPost || r.URL.Path != "/v1/messages" || r.ContentLength > maxBodyBytes {
		b.next.ServeHTTP(w, r)
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	r.Body = io.NopCloser(bytes.NewReader(body))
	if err != nil {
		b.next.ServeHTTP(w, r)
		return
	}
	req, apiErr := parseRequest(body, false)
	if apiErr != nil {
		b.next.ServeHTTP(w, r)
		return
	}
	prompt := lastUserText(req.turns)
	b.note(prompt, false)
	b.next.ServeHTTP(&promptWriter{ResponseWriter: w, b: b, prompt: prompt}, r)
}

// promptWriter watches an answer for its end: the message_stop event of a
// stream (the fake writes one event per Write), or a 200 JSON body written
// whole (the fake writes it in one Write of Content-Length bytes).
type promptWriter struct {
	http.ResponseWriter
	b      *ByPrompt
	prompt string
	status int
	done   bool
}

func (p *promptWriter) WriteHeader(status int) {
	if p.status == 0 {
		p.status = status
	}
	p.ResponseWriter.WriteHeader(status)
}

func (p *promptWriter) Write(data []byte) (int, error) {
	if p.status == 0 {
		p.status = http.StatusOK
	}
	if !p.done && p.status == http.StatusOK {
		h := p.Header()
		switch {
		case strings.HasPrefix(h.Get("Content-Type"), "text/event-stream"):
			if bytes.HasPrefix(data, []byte("event: message_stop\n")) {
				p.done = true
			}
		case strings.HasPrefix(h.Get("Content-Type"), "application/json"):
			if n, err := strconv.Atoi(h.Get("Content-Length")); err == nil && n == len(data) && json.Valid(data) {
				p.done = true
			}
		}
		if p.done {
			p.b.note(p.prompt, true)
		}
	}
	return p.ResponseWriter.Write(data)
}

// Flush lets http.ResponseController flush through the wrapper.
func (p *promptWriter) Flush() {
	if f, ok := p.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// Unwrap lets http.ResponseController reach the connection (hijack, flush).
func (p *promptWriter) Unwrap() http.ResponseWriter { return p.ResponseWriter }

// ReadJournal reads the counts back from a ByPrompt journal (or several,
// concatenated: the journals of a fake that was restarted). A line cut
// short by a killed process is skipped.
func ReadJournal(r io.Reader) (map[string]PromptCount, error) {
	counts := map[string]PromptCount{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), maxBodyBytes)
	for sc.Scan() {
		kind, quoted, ok := strings.Cut(sc.Text(), "\t")
		if !ok {
			continue
		}
		prompt, err := strconv.Unquote(quoted)
		if err != nil {
			continue
		}
		c := counts[prompt]
		switch kind {
		case "call":
			c.Calls++
		case "complete":
			c.Complete++
		default:
			continue
		}
		counts[prompt] = c
	}
	return counts, sc.Err()
}
