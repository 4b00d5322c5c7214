package upstream_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http/httptest"
	"sort"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/upstream"
)

func batchFake(t *testing.T, delay time.Duration) (*fakeanthropic.Server, *upstream.Client) {
	t.Helper()
	f, err := fakeanthropic.New(fakeanthropic.Config{APIKeys: []string{key}, BatchDelay: delay})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	c := upstream.New(upstream.Options{BaseURL: srv.URL, APIKey: key})
	t.Cleanup(c.Close)
	return f, c
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
