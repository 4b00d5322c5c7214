package upstream_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/upstream"
)

func batchFake(t *testing.T, delay time.Duration) (*fakeanthropic.Server, *upstream.Client) {
	t.Helper()
	f, c, _ := batchServer(t, fakeanthropic.Config{APIKeys: []string{key}, BatchDelay: delay})
	return f, c
}

// batchServer serves a fake with cfg over HTTP, and a client of it; url is
// the fake's address.
func batchServer(t *testing.T, cfg fakeanthropic.Config) (f *fakeanthropic.Server, c *upstream.Client, url string) {
	t.Helper()
	f, err := fakeanthropic.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	c = upstream.New(upstream.Options{BaseURL: srv.URL, APIKey: key})
	t.Cleanup(c.Close)
	return f, c, srv.URL
}

// A batch goes through its life: created in progress, ended after the
// fake's processing delay, its results read once per request, each a
// Message (with its text and usage, as Stream gives them) or the error
// the Messages API would have answered; "stream" in a request is dropped.
func TestBatchClient(t *testing.T) {
	_, c := batchFake(t, 200*time.Millisecond)
	ctx := context.Background()
	reqs := []upstream.BatchRequest{
		{CustomID: "job_a", Body: body(t, "first [[reply_tokens=7]]", map[string]any{"stream": true})},
		{CustomID: "job_b", Body: body(t, "second", nil)},
		{CustomID: "job_c", Body: json.RawMessage(`{"model":"claude-sonnet-4-6","messages":[]}`)},
	}
	b, err := c.CreateBatch(ctx, reqs)
	if err != nil {
		t.Fatal(err)
	}
	if b.ID == "" || b.Ended() || b.Counts.Processing != 3 {
		t.Fatalf("new batch: %+v, want in progress with 3 processing", b)
	}
	harness.Eventually(t, 10*time.Second, func() bool {
		b, err = c.GetBatch(ctx, b.ID)
		return err == nil && b.Ended()
	}, "the batch to end (last: %+v, %v)", b, err)
	if b.Counts.Succeeded != 2 || b.Counts.Errored != 1 || b.EndedAt.IsZero() {
		t.Fatalf("ended batch: %+v, want 2 succeeded and 1 errored", b)
	}
	var got []upstream.BatchResult
	if err := c.BatchResults(ctx, b.ID, func(r upstream.BatchResult) error { got = append(got, r); return nil }); err != nil {
		t.Fatal(err)
	}
	sort.Slice(got, func(i, j int) bool { return got[i].CustomID < got[j].CustomID })
	if len(got) != 3 {
		t.Fatalf("%d results, want 3: %+v", len(got), got)
	}
	a := got[0]
	var m struct {
		Type    string `json:"type"`
		Model   string `json:"model"`
		Content []any  `json:"content"`
	}
	if err := json.Unmarshal(a.Message, &m); err != nil || m.Type != "message" || m.Model != "claude-sonnet-4-6" || len(m.Content) == 0 {
		t.Errorf("job_a's message: %s (%v)", a.Message, err)
	}
	if a.Type != "succeeded" || a.Text == "" || a.Usage.OutputTokens != 7 || a.Usage.InputTokens == 0 {
		t.Errorf("job_a: %+v, want succeeded with text and 7 output tokens", a)
	}
	if got[1].Type != "succeeded" || got[1].CustomID != "job_b" {
		t.Errorf("job_b: %+v", got[1])
	}
	if e := got[2]; e.Type != "errored" || e.ErrorType != "invalid_request_error" || e.ErrorMessage == "" || e.Message != nil {
		t.Errorf("job_c: %+v, want errored with invalid_request_error", e)
	}
}

// A canceled batch ends with its unprocessed requests canceled; a batch
// that does not exist is a fatal error, not one to retry.
func TestBatchClientCancel(t *testing.T) {
	_, c := batchFake(t, time.Hour)
	ctx := context.Background()
	b, err := c.CreateBatch(ctx, []upstream.BatchRequest{{CustomID: "job_a", Body: body(t, "hi", nil)}})
	if err != nil {
		t.Fatal(err)
	}
	if b, err = c.CancelBatch(ctx, b.ID); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 10*time.Second, func() bool {
		b, err = c.GetBatch(ctx, b.ID)
		return err == nil && b.Ended()
	}, "the canceled batch to end (last: %+v, %v)", b, err)
	var types []string
	if err := c.BatchResults(ctx, b.ID, func(r upstream.BatchResult) error { types = append(types, r.Type); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(types) != 1 || types[0] != "canceled" || b.Counts.Canceled != 1 {
		t.Errorf("canceled batch: %+v, results %v", b, types)
	}
	_, err = c.GetBatch(ctx, "msgbatch_nope")
	var ue *upstream.Error
	if !errors.As(err, &ue) || ue.Kind != upstream.KindFatal {
		t.Errorf("an unknown batch: %v, want a fatal upstream error", err)
	}
}

// An outage of the Batches API is the upstream's, not the request's: a 529
// is retryable and infra, a 429 rate-limited with its retry-after; once
// it ends the same calls work.
func TestBatchClientOutage(t *testing.T) {
	f, c := batchFake(t, 0)
	ctx := context.Background()
	b, err := c.CreateBatch(ctx, []upstream.BatchRequest{{CustomID: "job_a", Body: body(t, "hi", nil)}})
	if err != nil {
		t.Fatal(err)
	}
	f.SetBatchOutage(529)
	calls := map[string]func() error{
		"CreateBatch": func() error {
			_, err := c.CreateBatch(ctx, []upstream.BatchRequest{{CustomID: "job_b", Body: body(t, "hi", nil)}})
			return err
		},
		"GetBatch":    func() error { _, err := c.GetBatch(ctx, b.ID); return err },
		"ListBatches": func() error { _, err := c.ListBatches(ctx, time.Time{}); return err },
	}
	for name, call := range calls {
		var ue *upstream.Error
		if err := call(); !errors.As(err, &ue) || ue.Kind != upstream.KindRetryable || ue.Status != 529 ||
			ue.Type != "overloaded_error" || !ue.Infra() || ue.Reason() != "overloaded" {
			t.Errorf("%s during a 529 outage: %#v, want a retryable, infra 529 overloaded_error", name, err)
		}
	}
	f.SetBatchOutage(429)
	var ue *upstream.Error
	if _, err := c.GetBatch(ctx, b.ID); !errors.As(err, &ue) || ue.Kind != upstream.KindRateLimited || ue.RetryAfter != time.Second {
		t.Errorf("GetBatch during a 429 outage: %v, want rate-limited with retry-after 1s", err)
	}
	f.SetBatchOutage(0)
	for name, call := range calls {
		if err := call(); err != nil {
			t.Errorf("%s after the outage: %v", name, err)
		}
	}
}

// The fake's HTTP control refuses a status it cannot send, and turns an
// outage on and off.
func TestBatchOutageControl(t *testing.T) {
	_, c, url := batchServer(t, fakeanthropic.Config{APIKeys: []string{key}})
	control := func(body string) (int, string) {
		t.Helper()
		res, err := http.Post(url+"/_fake/batches/outage", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res.StatusCode, string(b)
	}
	if code, b := control(`{"status":502}`); code != http.StatusBadRequest || !strings.Contains(b, "502 is not an outage") {
		t.Errorf("status 502: %d %s, want 400 saying why", code, b)
	}
	if code, b := control(`{"status":503}`); code != http.StatusNoContent {
		t.Fatalf("status 503: %d %s", code, b)
	}
	var ue *upstream.Error
	if _, err := c.ListBatches(context.Background(), time.Time{}); !errors.As(err, &ue) || ue.Kind != upstream.KindRetryable || ue.Status != 503 {
		t.Errorf("ListBatches during a 503 outage: %v, want retryable 503", err)
	}
	if code, b := control(`{"status":0}`); code != http.StatusNoContent {
		t.Fatalf("status 0: %d %s", code, b)
	}
	if got, err := c.ListBatches(context.Background(), time.Time{}); err != nil || len(got) != 0 {
		t.Errorf("ListBatches after the outage: %v %v, want none and no error", got, err)
	}
}

// ListBatches follows the pages (of 100) back to since and no further:
// every batch created at or after since, newest first, none before it.
func TestListBatches(t *testing.T) {
	var mu sync.Mutex
	now := time.Date(2026, 5, 6, 7, 8, 9, 0, time.UTC)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func() { mu.Lock(); defer mu.Unlock(); now = now.Add(time.Millisecond) }
	f, err := fakeanthropic.New(fakeanthropic.Config{APIKeys: []string{key}, Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	var lists atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && r.URL.Path == "/v1/messages/batches" {
			lists.Add(1)
		}
		f.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	c := upstream.New(upstream.Options{BaseURL: srv.URL, APIKey: key})
	t.Cleanup(c.Close)
	ctx := context.Background()

	create := func(n int) []string {
		var ids []string
		for range n {
			b, err := c.CreateBatch(ctx, []upstream.BatchRequest{{CustomID: "job", Body: body(t, "hi", nil)}})
			if err != nil {
				t.Fatal(err)
			}
			ids = append(ids, b.ID)
			advance()
		}
		return ids
	}
	create(105) // before since: never returned, and only the page reaching them read
	since := clock()
	recent := create(230)
	slices.Reverse(recent) // newest first

	got, err := c.ListBatches(ctx, since)
	if err != nil {
		t.Fatal(err)
	}
	ids := make([]string, len(got))
	for i, b := range got {
		ids[i] = b.ID
		if b.CreatedAt.Before(since) {
			t.Errorf("batch %s created %v, before since %v", b.ID, b.CreatedAt, since)
		}
	}
	if !slices.Equal(ids, recent) {
		t.Errorf("ListBatches: %d batches, want the %d created since, newest first\n got %v\nwant %v", len(ids), len(recent), ids, recent)
	}
	if !got[len(got)-1].CreatedAt.Equal(since) {
		t.Errorf("the oldest batch listed was created %v, want since (%v) itself", got[len(got)-1].CreatedAt, since)
	}
	if n := lists.Load(); n != 3 {
		t.Errorf("%d list requests, want 3 (pages of 100; the third reaches before since)", n)
	}

	// Since before everything: every page, to the end.
	lists.Store(0)
	if all, err := c.ListBatches(ctx, time.Time{}); err != nil || len(all) != 335 {
		t.Errorf("ListBatches since the zero time: %d batches, %v; want 335", len(all), err)
	}
	if n := lists.Load(); n != 4 {
		t.Errorf("%d list requests for 335 batches, want 4", n)
	}
	// Since after everything: none, one page read.
	if none, err := c.ListBatches(ctx, clock()); err != nil || len(none) != 0 {
		t.Errorf("ListBatches since now: %v, %v; want none", none, err)
	}
}
