package fakeanthropic

import (
	"bufio"
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// These tests sit inside the package to replace Server.pause, so that output
// advances one token at a time on the test's command instead of a timer.

const internalKey = "sk-internal"

func newInternal(t *testing.T, cfg Config) (*Server, *httptest.Server) {
	t.Helper()
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	return s, srv
}

func newPost(ctx context.Context, t *testing.T, url, body string) *http.Request {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url+"/v1/messages", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("x-api-key", internalKey)
	req.Header.Set("anthropic-version", "2023-06-01")
	return req
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		<-tick.C
	}
}

// readEvent reads one server-sent event and returns its name.
func readEvent(t *testing.T, r *bufio.Reader) string {
	t.Helper()
	var name string
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("reading event: %v", err)
		}
		line = strings.TrimSuffix(line, "\n")
		if line == "" {
			return name
		}
		if n, ok := strings.CutPrefix(line, "event: "); ok {
			name = n
		}
	}
}

func TestStreamFlushesOneDeltaPerToken(t *testing.T) {
	s, srv := newInternal(t, Config{TokensPerSecond: 10, Latency: 100 * time.Millisecond})
	step := make(chan struct{}, 1)
	var mu sync.Mutex
	var dues []time.Time
	s.pause = func(ctx context.Context, due time.Time) error {
		mu.Lock()
		dues = append(dues, due)
		mu.Unlock()
		select {
		case <-step:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	step <- struct{}{} // the latency before the first byte
	res, err := srv.Client().Do(newPost(ctx, t, srv.URL,
		`{"model":"claude-x","max_tokens":50,"stream":true,"messages":[{"role":"user","content":"go [[reply_tokens=3]]"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	r := bufio.NewReader(res.Body)
	var got []string
	for range 3 {
		got = append(got, readEvent(t, r))
	}
	for range 3 {
		// The handler now waits for the next step: this delta can only be
		// read if it was flushed on its own.
		step <- struct{}{}
		got = append(got, readEvent(t, r))
	}
	for range 3 {
		got = append(got, readEvent(t, r))
	}
	want := []string{"message_start", "ping", "content_block_start",
		"content_block_delta", "content_block_delta", "content_block_delta",
		"content_block_stop", "message_delta", "message_stop"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("events (-want +got):\n%s", diff)
	}

	mu.Lock()
	defer mu.Unlock()
	var offsets []time.Duration
	for _, d := range dues {
		offsets = append(offsets, d.Sub(dues[0]))
	}
	// Latency first, then one token every 1/10 s.
	if diff := cmp.Diff([]time.Duration{0, 100 * time.Millisecond, 200 * time.Millisecond, 300 * time.Millisecond}, offsets); diff != "" {
		t.Errorf("pacing offsets from the first byte (-want +got):\n%s", diff)
	}
}

func TestCanceledRequestEndsPromptly(t *testing.T) {
	tests := []struct {
		name       string
		cfg        Config
		stream     bool
		wantStatus int
	}{
		// Blocked in the latency wait, before any byte.
		{"before first byte", Config{Latency: time.Hour}, false, statusClientClosed},
		// Blocked between tokens of a non-streaming answer.
		{"non-streaming", Config{TokensPerSecond: 0.001}, false, statusClientClosed},
		// Blocked between deltas of a stream that answered 200.
		{"streaming", Config{TokensPerSecond: 0.001}, true, http.StatusOK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.cfg.Groups = []Group{{Name: "g", Models: []string{"claude-*"}, RPM: 100, InputTPM: 100_000, OutputTPM: 8_000}}
			tt.cfg.OTPMMode = OTPMReserve // the reservation of the canceled call must come back
			clock := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
			tt.cfg.Clock = func() time.Time { return clock }
			s, srv := newInternal(t, tt.cfg)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()

			body := `{"model":"claude-x","max_tokens":8000,"stream":` + map[bool]string{true: "true", false: "false"}[tt.stream] +
				`,"messages":[{"role":"user","content":"go"}]}`
			req := newPost(ctx, t, srv.URL, body)
			done := make(chan error, 1)
			answered := make(chan struct{})
			go func() {
				res, err := srv.Client().Do(req)
				close(answered)
				if err == nil {
					// Read until the cancel cuts the body.
					_, err = bufio.NewReader(res.Body).ReadString(0)
					res.Body.Close()
				}
				done <- err
			}()
			waitUntil(t, "the request in flight", func() bool { return s.Stats().InFlight == 1 })
			if tt.stream {
				<-answered // the stream has started: 200 is on the wire
			}
			cancel()
			waitUntil(t, "the handler to finish", func() bool { return s.Stats().InFlight == 0 })
			if err := <-done; err == nil {
				t.Error("client saw no error from its canceled request")
			}

			st := s.Stats()
			if len(st.Log) != 1 || st.Log[0].Status != tt.wantStatus || st.Log[0].OutputTokens != 0 {
				t.Errorf("log %+v: want one record, status %d, no output", st.Log, tt.wantStatus)
			}
			// Reserve mode gave the unused max_tokens back: 8,000 fit again.
			req = newPost(context.Background(), t, srv.URL, `{"model":"claude-x","max_tokens":8000,"messages":[{"role":"user","content":"[[reply_tokens=0]]"}]}`)
			s.pause = func(ctx context.Context, _ time.Time) error { return ctx.Err() }
			res, err := srv.Client().Do(req)
			if err != nil {
				t.Fatal(err)
			}
			res.Body.Close()
			if res.StatusCode != http.StatusOK {
				t.Errorf("max_tokens 8000 after the cancel: status %d, want 200 (reservation returned)", res.StatusCode)
			}
		})
	}
}

func TestMaxInFlight(t *testing.T) {
	s, srv := newInternal(t, Config{Groups: []Group{
		{Name: "a", Models: []string{"claude-a*"}, RPM: 100, InputTPM: 100_000, OutputTPM: 100_000},
		{Name: "b", Models: []string{"claude-b*"}, RPM: 100, InputTPM: 100_000, OutputTPM: 100_000},
	}})
	release := make(chan struct{})
	var paused atomic.Int64
	s.pause = func(ctx context.Context, _ time.Time) error {
		paused.Add(1)
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	models := []string{"claude-a1", "claude-a2", "claude-a3", "claude-b1", "claude-b2"}
	var wg sync.WaitGroup
	statuses := make([]int, len(models))
	for i, m := range models {
		req := newPost(context.Background(), t, srv.URL, `{"model":"`+m+`","max_tokens":10,"messages":[{"role":"user","content":"x"}]}`)
		wg.Go(func() {
			res, err := srv.Client().Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			res.Body.Close()
			statuses[i] = res.StatusCode
		})
	}
	// Each request pauses before its first byte, its group known.
	waitUntil(t, "five requests in flight", func() bool { return paused.Load() == 5 })
	if st := s.Stats(); st.InFlight != 5 {
		t.Errorf("in flight %d, want 5", st.InFlight)
	}
	close(release)
	wg.Wait()

	st := s.Stats()
	got := []any{st.InFlight, st.MaxInFlight, st.MaxInFlightByGroup, statuses}
	want := []any{int64(0), int64(5), map[string]int64{"a": 3, "b": 2}, []int{200, 200, 200, 200, 200}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("in-flight stats (-want +got):\n%s", diff)
	}
}

func TestLogKeepsTheLast10000(t *testing.T) {
	s, err := New(Config{})
	if err != nil {
		t.Fatal(err)
	}
	const n = logCapacity + 5
	for i := range n {
		s.requestStarted()
		s.requestFinished(RequestRecord{Status: 200, OutputTokens: i})
	}
	log := s.Stats().Log
	if len(log) != logCapacity || log[0].OutputTokens != 5 || log[len(log)-1].OutputTokens != n-1 {
		t.Fatalf("log of %d from %d to %d: want %d records from 5 to %d",
			len(log), log[0].OutputTokens, log[len(log)-1].OutputTokens, logCapacity, n-1)
	}
	for i := 1; i < len(log); i++ {
		if log[i].OutputTokens != log[i-1].OutputTokens+1 {
			t.Fatalf("log out of order at %d", i)
		}
	}
	if st := s.Stats(); st.Requests != n || st.ByStatus[200] != n {
		t.Errorf("requests %d, 200s %d: want %d", st.Requests, st.ByStatus[200], n)
	}
}

func TestBucketState(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	tests := []struct {
		name         string
		limit        int
		level        float64
		exact        bool
		want         int
		wantResetSec int
	}{
		{"exact floors", 50, 48.7, true, 48, 2},                 // 1.3 * 60/50 = 1.56 s
		{"tokens round down", 30_000, 28_499, false, 28_000, 4}, // 3.002 s, rounded up
		{"tokens round up", 30_000, 28_500, false, 29_000, 3},
		{"never below zero", 8_000, -1_000, false, 0, 68}, // 9,000 * 60/8,000 = 67.5 s
		{"never above the limit", 500, 500, false, 500, 0},
		{"small and low", 500, 300, false, 0, 24},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newBucket(tt.limit, now)
			b.level = tt.level
			got := b.state(now, tt.exact)
			want := limitState{limit: tt.limit, remaining: tt.want, reset: now.Add(time.Duration(tt.wantResetSec) * time.Second)}
			if diff := cmp.Diff(want, got, cmp.AllowUnexported(limitState{})); diff != "" {
				t.Errorf("state (-want +got):\n%s", diff)
			}
		})
	}
}

func TestBucketRefill(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	b := newBucket(3, now)
	b.take(3)
	b.refill(now.Add(-time.Hour)) // a clock that goes back refills nothing
	b.refill(now.Add(10 * time.Second))
	if b.level != 0.5 {
		t.Errorf("level %v after 10 s at 3/min: want 0.5", b.level)
	}
	b.refill(now.Add(time.Hour))
	if b.level != 3 {
		t.Errorf("level %v after an hour: want the capacity, 3", b.level)
	}
}

func TestPlanReply(t *testing.T) {
	req := func(text string, maxTokens int, stops ...string) *messagesRequest {
		turns := []turn{{role: "user", blocks: []block{{typ: "text", text: text}}}}
		return &messagesRequest{maxTokens: maxTokens, stopSequences: stops, turns: turns,
			directives: parseDirectives(lastUserText(turns))}
	}
	a, b := textTokens(planReply(req("same prompt", 100), 30)), textTokens(planReply(req("same prompt", 100), 30))
	if diff := cmp.Diff(a, b); diff != "" {
		t.Errorf("same prompt, different replies (-first +second):\n%s", diff)
	}
	for _, tok := range a {
		if strings.Count(tok, " ") != 1 || !strings.HasSuffix(tok, " ") || len(tok) < 2 {
			t.Errorf("token %q: want one word and a space", tok)
		}
	}
	if c := textTokens(planReply(req("another prompt", 100), 30)); cmp.Equal(a, c) {
		t.Errorf("different prompts gave the same reply %q", strings.Join(c, ""))
	}
	if r := textTokens(planReply(req("x [[reply_tokens=5]] [[reply_tokens=7]]", 100), 30)); len(r) != 7 {
		t.Errorf("%d tokens: want the last directive, 7", len(r))
	}
	r := planReply(req("x", 100, "calm"), 500)
	if text := strings.Join(textTokens(r), ""); r.stopReason != stopStopSequence || *r.stopSequence != "calm" || strings.Contains(text, "calm") {
		t.Errorf("stop %q %v, text %q: want a stop before the first \"calm\"", r.stopReason, r.stopSequence, text)
	}
}

// textTokens are the texts of a reply's text_delta deltas.
func textTokens(r reply) []string {
	var out []string
	for _, b := range r.blocks {
		for _, d := range b.deltas {
			if td, ok := d.delta.(textDelta); ok {
				out = append(out, td.Text)
			}
		}
	}
	return out
}
