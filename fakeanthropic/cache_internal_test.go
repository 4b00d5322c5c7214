package fakeanthropic

import (
	"bufio"
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// readEventData reads one server-sent event and returns its name and data.
func readEventData(t *testing.T, r *bufio.Reader) (name, data string) {
	t.Helper()
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("reading event: %v", err)
		}
		line = strings.TrimSuffix(line, "\n")
		if line == "" {
			return name, data
		}
		if v, ok := strings.CutPrefix(line, "event: "); ok {
			name = v
		}
		if v, ok := strings.CutPrefix(line, "data: "); ok {
			data = v
		}
	}
}

// TestCacheReadableOnceTheAnswerBegins: a call that writes the cache makes
// its entry readable when its answer begins (message_start), not when it is
// admitted. A (cold cache) and B, which starts before A's message_start,
// both write; C, which starts after A's message_start while A still
// streams and B has not begun, reads.
func TestCacheReadableOnceTheAnswerBegins(t *testing.T) {
	clock := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	s, srv := newInternal(t, Config{
		Groups: []Group{{Name: "g", Models: []string{"claude-*"}, RPM: 100, InputTPM: 1_000_000, OutputTPM: 100_000}},
		Clock:  func() time.Time { return clock },
	})
	// Every pause (the first byte, then each token) waits for its own gate,
	// handed to the test in the order the pauses begin.
	arrivals := make(chan chan struct{}, 16)
	s.pause = func(ctx context.Context, _ time.Time) error {
		gate := make(chan struct{})
		arrivals <- gate
		select {
		case <-gate:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	nextGate := func(what string) chan struct{} {
		t.Helper()
		select {
		case g := <-arrivals:
			return g
		case <-time.After(5 * time.Second):
			t.Fatalf("timed out waiting for %s to pause", what)
			return nil
		}
	}
	system := strings.Repeat("shared instructions ", 300) // 1,500 tokens
	const prefix = 8 + 1500
	body := func(question string, replyTokens int) string {
		b, _ := json.Marshal(map[string]any{
			"model": "claude-sonnet-4-5", "max_tokens": 10, "stream": true,
			"system":   []any{map[string]any{"type": "text", "text": system, "cache_control": map[string]any{"type": "ephemeral"}}},
			"messages": []any{map[string]any{"role": "user", "content": question + " [[reply_tokens=" + string(rune('0'+replyTokens)) + "]]"}},
		})
		return string(b)
	}
	type answer struct {
		res *http.Response
		err error
	}
	start := func(b string) chan answer {
		ch := make(chan answer, 1)
		req := newPost(context.Background(), t, srv.URL, b)
		go func() {
			res, err := srv.Client().Do(req)
			ch <- answer{res, err}
		}()
		return ch
	}
	// messageStart waits for the answer's headers and reads its message_start.
	messageStart := func(ch chan answer) (usage, *bufio.Reader, *http.Response) {
		t.Helper()
		a := <-ch
		if a.err != nil {
			t.Fatal(a.err)
		}
		t.Cleanup(func() { a.res.Body.Close() })
		r := bufio.NewReader(a.res.Body)
		name, data := readEventData(t, r)
		var ev messageStartEvent
		if err := json.Unmarshal([]byte(data), &ev); err != nil || name != "message_start" {
			t.Fatalf("first event %q %s: want message_start (%v)", name, data, err)
		}
		return ev.Message.Usage, r, a.res
	}
	inputSide := func(u usage) [3]int { return [3]int{u.InputTokens, u.CacheCreationInputTokens, u.CacheReadInputTokens} }

	a := start(body("question A", 1))
	gateA := nextGate("A's first byte")
	b := start(body("question B", 0))
	gateB := nextGate("B's first byte")

	close(gateA) // A begins: message_start goes out, then A waits before its token
	usageA, readerA, _ := messageStart(a)
	gateA2 := nextGate("A's token")

	c := start(body("question C", 0))
	close(nextGate("C's first byte"))
	usageC, _, _ := messageStart(c)

	close(gateB)
	usageB, _, _ := messageStart(b)
	close(gateA2)
	for name := ""; name != "message_stop"; name, _ = readEventData(t, readerA) {
	}

	rest := func(question string) int { return 4 + (len(question+" [[reply_tokens=0]]")+3)/4 }
	want := [][3]int{
		{rest("question A"), prefix, 0}, // cold cache: written
		{rest("question B"), prefix, 0}, // started before A's message_start: written too
		{rest("question C"), 0, prefix}, // started after it: read
	}
	if diff := cmp.Diff(want, [][3]int{inputSide(usageA), inputSide(usageB), inputSide(usageC)}); diff != "" {
		t.Errorf("input_tokens, cache_creation_input_tokens, cache_read_input_tokens of A, B, C (-want +got):\n%s", diff)
	}
	waitUntil(t, "all three logged", func() bool { return len(s.Stats().Log) == 3 })
	creations := 0
	for _, rec := range s.Stats().Log {
		if rec.CacheCreationInputTokens > 0 {
			creations++
		}
	}
	if creations != 2 {
		t.Errorf("%d calls wrote the cache, want 2 (A and B)", creations)
	}
}

// TestCacheNotWrittenByCallsThatNeverBegin: a call canceled before its
// first byte writes nothing.
func TestCacheNotWrittenByCallsThatNeverBegin(t *testing.T) {
	s, srv := newInternal(t, Config{Latency: time.Hour})
	ctx, cancel := context.WithCancel(context.Background())
	b, _ := json.Marshal(map[string]any{
		"model": "claude-sonnet-4-5", "max_tokens": 10,
		"system":   []any{map[string]any{"type": "text", "text": strings.Repeat("abcd", 1100), "cache_control": map[string]any{"type": "ephemeral"}}},
		"messages": []any{map[string]any{"role": "user", "content": "hi"}},
	})
	done := make(chan struct{})
	go func() {
		defer close(done)
		res, err := srv.Client().Do(newPost(ctx, t, srv.URL, string(b)))
		if err == nil {
			res.Body.Close()
		}
	}()
	waitUntil(t, "the call in flight", func() bool { return s.Stats().InFlight == 1 })
	cancel()
	<-done
	waitUntil(t, "the call to end", func() bool { return s.Stats().InFlight == 0 })
	if n := s.Stats().CacheEntries; n != 0 {
		t.Errorf("%d cache entries after a call canceled before its answer, want 0", n)
	}
}
