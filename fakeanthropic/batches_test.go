package fakeanthropic_test

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/anthropics/anthropic-sdk-go/v2"

	"github.com/sluice-dev/sluice/fakeanthropic"
)

// batchParams is a batch request with one user message.
func batchParams(id, model, text string) anthropic.MessageBatchNewParamsRequest {
	return anthropic.MessageBatchNewParamsRequest{CustomID: id, Params: anthropic.MessageBatchNewParamsRequestParams{
		Model: anthropic.Model(model), MaxTokens: 50,
		Messages: []anthropic.MessageParam{anthropic.NewUserMessage(anthropic.NewTextBlock(text))},
	}}
}

// The official SDK creates a batch, polls it until it ends, and reads its
// results: each request answered as the Messages API answers it, an
// unknown model errored, and none of it in the Messages buckets.
func TestBatchLifecycleWithTheSDK(t *testing.T) {
	clock := newTestClock()
	fake, srv := newFake(t, fakeanthropic.Config{Clock: clock.Now, BatchDelay: time.Minute,
		Groups: []fakeanthropic.Group{{Name: "sonnet", Models: []string{"claude-sonnet-*"}, RPM: 1, InputTPM: 100000, OutputTPM: 100000}}})
	client := newClient(srv)
	ctx := context.Background()
	b, err := client.Messages.Batches.New(ctx, anthropic.MessageBatchNewParams{Requests: []anthropic.MessageBatchNewParamsRequest{
		batchParams("a", testModel, "one [[reply_tokens=5]]"),
		batchParams("b", testModel, "two [[reply_tokens=7]]"),
		batchParams("c", "claude-unknown-9", "three"),
	}})
	if err != nil {
		t.Fatal(err)
	}
	if b.ProcessingStatus != anthropic.MessageBatchProcessingStatusInProgress || b.RequestCounts.Processing != 3 || b.ResultsURL != "" {
		t.Fatalf("new batch: %+v", b)
	}
	// Results before the end: refused with a sentence.
	early := client.Messages.Batches.ResultsStreaming(ctx, b.ID, anthropic.MessageBatchResultsParams{})
	for early.Next() {
		t.Fatalf("a result of a batch still processing: %s", early.Current().RawJSON())
	}
	if early.Err() == nil {
		t.Fatal("results of a batch still processing: no error")
	}
	clock.Advance(time.Minute)
	b, err = client.Messages.Batches.Get(ctx, b.ID, anthropic.MessageBatchGetParams{})
	if err != nil {
		t.Fatal(err)
	}
	if b.ProcessingStatus != anthropic.MessageBatchProcessingStatusEnded || b.RequestCounts.Succeeded != 2 || b.RequestCounts.Errored != 1 || b.ResultsURL == "" || b.EndedAt.IsZero() {
		t.Fatalf("ended batch: %+v", b)
	}
	got := map[string]anthropic.MessageBatchIndividualResponse{}
	st := client.Messages.Batches.ResultsStreaming(ctx, b.ID, anthropic.MessageBatchResultsParams{})
	for st.Next() {
		got[st.Current().CustomID] = st.Current()
	}
	if err := st.Err(); err != nil {
		t.Fatal(err)
	}
	for id, want := range map[string]int64{"a": 5, "b": 7} {
		r := got[id].Result
		if r.Type != "succeeded" || r.AsSucceeded().Message.Usage.OutputTokens != want || len(r.AsSucceeded().Message.Content) == 0 {
			t.Errorf("result %s: %s", id, got[id].RawJSON())
		}
	}
	if r := got["c"].Result; r.Type != "errored" || r.AsErrored().Error.Error.Type != "not_found_error" {
		t.Errorf("result c: %s", got["c"].RawJSON())
	}
	if s := fake.Stats(); s.Batches != 1 || s.BatchRequests != 3 || s.Requests != 0 {
		t.Errorf("stats: batches %d, batch requests %d, messages requests %d", s.Batches, s.BatchRequests, s.Requests)
	}
	// Deleted, it is gone.
	if _, err := client.Messages.Batches.Delete(ctx, b.ID, anthropic.MessageBatchDeleteParams{}); err != nil {
		t.Fatal(err)
	}
	if _, err := client.Messages.Batches.Get(ctx, b.ID, anthropic.MessageBatchGetParams{}); err == nil {
		t.Error("a deleted batch is still there")
	}
}

// Canceling a batch before it ends cancels its requests; the cancel
// answers "canceling", the next read "ended".
func TestBatchCancel(t *testing.T) {
	clock := newTestClock()
	_, srv := newFake(t, fakeanthropic.Config{Clock: clock.Now, BatchDelay: time.Hour})
	client := newClient(srv)
	ctx := context.Background()
	b, err := client.Messages.Batches.New(ctx, anthropic.MessageBatchNewParams{Requests: []anthropic.MessageBatchNewParamsRequest{
		batchParams("a", testModel, "one"), batchParams("b", testModel, "two")}})
	if err != nil {
		t.Fatal(err)
	}
	c, err := client.Messages.Batches.Cancel(ctx, b.ID, anthropic.MessageBatchCancelParams{})
	if err != nil || c.ProcessingStatus != anthropic.MessageBatchProcessingStatusCanceling || c.CancelInitiatedAt.IsZero() {
		t.Fatalf("cancel: %+v %v", c, err)
	}
	b, err = client.Messages.Batches.Get(ctx, b.ID, anthropic.MessageBatchGetParams{})
	if err != nil || b.ProcessingStatus != anthropic.MessageBatchProcessingStatusEnded || b.RequestCounts.Canceled != 2 {
		t.Fatalf("after cancel: %+v %v", b, err)
	}
	st := client.Messages.Batches.ResultsStreaming(ctx, b.ID, anthropic.MessageBatchResultsParams{})
	n := 0
	for st.Next() {
		if st.Current().Result.Type != "canceled" {
			t.Errorf("result %s", st.Current().RawJSON())
		}
		n++
	}
	if st.Err() != nil || n != 2 {
		t.Fatalf("%d results, %v", n, st.Err())
	}
}

// Bad batches are refused whole with the reason; the processing queue's
// cap answers 429.
func TestBatchRefusals(t *testing.T) {
	_, srv := newFake(t, fakeanthropic.Config{BatchDelay: time.Hour, BatchQueueLimit: 3})
	for _, tc := range []struct {
		body   string
		status int
		want   string
	}{
		{`{"requests":[]}`, 400, "at least one request"},
		{`{"requests":[{"custom_id":"a b","params":{}}]}`, 400, "custom_id: 1 to 64 letters"},
		{`{"requests":[{"custom_id":"a","params":{}},{"custom_id":"a","params":{}}]}`, 400, "used twice"},
		{`{"requests":[{"custom_id":"a","params":{}},{"custom_id":"b","params":{}},{"custom_id":"c","params":{}},{"custom_id":"d","params":{}}]}`, 429, "processing queue"},
	} {
		resp, body := post(t, srv, "/v1/messages/batches", tc.body, nil)
		if resp.StatusCode != tc.status || !strings.Contains(string(body), tc.want) {
			t.Errorf("%s: %d %s, want %d with %q", tc.body, resp.StatusCode, body, tc.status, tc.want)
		}
	}
	resp, body := post(t, srv, "/v1/messages/batches/msgbatch_nope/cancel", "", nil)
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("cancel of an unknown batch: %d %s", resp.StatusCode, body)
	}
}
