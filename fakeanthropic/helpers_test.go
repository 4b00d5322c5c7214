package fakeanthropic_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/anthropics/anthropic-sdk-go/v2"
	"github.com/anthropics/anthropic-sdk-go/v2/option"
	"go.uber.org/goleak"

	"github.com/sluice-dev/sluice/fakeanthropic"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const (
	testKey   = "sk-test-key"
	testModel = "claude-sonnet-4-5"
)

// testClock is a Config.Clock that only moves when told.
type testClock struct {
	mu sync.Mutex
	t  time.Time
}

func newTestClock() *testClock {
	return &testClock{t: time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)}
}

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *testClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// newFake starts the fake behind an httptest server closed at cleanup.
func newFake(t testing.TB, cfg fakeanthropic.Config) (*fakeanthropic.Server, *httptest.Server) {
	t.Helper()
	fake, err := fakeanthropic.New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	srv := httptest.NewServer(fake)
	t.Cleanup(srv.Close)
	return fake, srv
}

// newClient is an SDK client for srv without retries, so that every answer
// of the fake reaches the test as it was sent.
func newClient(srv *httptest.Server, opts ...option.RequestOption) anthropic.Client {
	return anthropic.NewClient(append([]option.RequestOption{
		option.WithBaseURL(srv.URL),
		option.WithAPIKey(testKey),
		option.WithMaxRetries(0),
		option.WithHTTPClient(srv.Client()),
	}, opts...)...)
}

// userParams is a request with one user message.
func userParams(text string, maxTokens int64) anthropic.MessageNewParams {
	return anthropic.MessageNewParams{
		Model:     testModel,
		MaxTokens: maxTokens,
		Messages:  []anthropic.MessageParam{anthropic.NewUserMessage(anthropic.NewTextBlock(text))},
	}
}

// rawBody is a minimal valid Messages body as raw JSON.
func rawBody(text string, maxTokens int, stream bool) string {
	b, _ := json.Marshal(map[string]any{
		"model":      testModel,
		"max_tokens": maxTokens,
		"stream":     stream,
		"messages":   []map[string]any{{"role": "user", "content": text}},
	})
	return string(b)
}

// post sends a raw request with x-api-key and anthropic-version set, unless
// hdr overrides them (an empty value removes a header). It returns the
// response, its body read and closed.
func post(t testing.TB, srv *httptest.Server, path, body string, hdr map[string]string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, srv.URL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("content-type", "application/json")
	req.Header.Set("x-api-key", testKey)
	req.Header.Set("anthropic-version", "2023-06-01")
	for k, v := range hdr {
		if v == "" {
			req.Header.Del(k)
		} else {
			req.Header.Set(k, v)
		}
	}
	res, err := srv.Client().Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatalf("POST %s: read body: %v", path, err)
	}
	return res, b
}

// errorShape is the API's error body.
type errorShape struct {
	Type  string `json:"type"`
	Error struct {
		Type    string `json:"type"`
		Message string `json:"message"`
		Details *struct {
			ErrorCode string `json:"error_code"`
		} `json:"details"`
	} `json:"error"`
	RequestID string `json:"request_id"`
}

// decodeError checks that b is an API error body for res and returns it.
func decodeError(t testing.TB, res *http.Response, b []byte) errorShape {
	t.Helper()
	var e errorShape
	if err := json.Unmarshal(b, &e); err != nil {
		t.Fatalf("error body %q: %v", b, err)
	}
	if e.Type != "error" || e.Error.Type == "" || e.Error.Message == "" {
		t.Errorf("error body %s: want type error with error.type and error.message", b)
	}
	if id := res.Header.Get("request-id"); !strings.HasPrefix(id, "req_") || e.RequestID != id {
		t.Errorf("request_id %q, request-id header %q: want the same req_… id", e.RequestID, id)
	}
	return e
}

// sseEvent is one server-sent event.
type sseEvent struct {
	name string
	data string
}

// readEvents parses a whole text/event-stream body.
func readEvents(t testing.TB, body []byte) []sseEvent {
	t.Helper()
	var events []sseEvent
	for _, chunk := range strings.Split(strings.TrimSpace(string(body)), "\n\n") {
		var ev sseEvent
		for _, line := range strings.Split(chunk, "\n") {
			switch {
			case strings.HasPrefix(line, "event: "):
				ev.name = strings.TrimPrefix(line, "event: ")
			case strings.HasPrefix(line, "data: "):
				ev.data = strings.TrimPrefix(line, "data: ")
			default:
				t.Fatalf("unexpected SSE line %q", line)
			}
		}
		if ev.name == "" || ev.data == "" {
			t.Fatalf("event without event: or data: line: %q", chunk)
		}
		events = append(events, ev)
	}
	return events
}

func eventNames(events []sseEvent) []string {
	names := make([]string, len(events))
	for i, ev := range events {
		names[i] = ev.name
	}
	return names
}

func ctxWithTimeout(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}
