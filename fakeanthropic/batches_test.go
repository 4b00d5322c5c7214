package fakeanthropic_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
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

// An outage of the Batches API answers every batches request with its
// status and the API's error for it, the Messages API untouched; ending it
// brings the batches back as they were.
func TestBatchOutage(t *testing.T) {
	fake, srv := newFake(t, fakeanthropic.Config{APIKeys: []string{testKey}})
	client := newClient(srv)
	ctx := context.Background()
	b, err := client.Messages.Batches.New(ctx, anthropic.MessageBatchNewParams{Requests: []anthropic.MessageBatchNewParamsRequest{
		batchParams("a", testModel, "one")}})
	if err != nil {
		t.Fatal(err)
	}
	fake.SetBatchOutage(529)
	_, err = client.Messages.Batches.New(ctx, anthropic.MessageBatchNewParams{Requests: []anthropic.MessageBatchNewParamsRequest{
		batchParams("a", testModel, "one")}})
	if e := asSDKError(t, err); e.Status != 529 || e.Type != "overloaded_error" || e.ShouldRetry != "true" {
		t.Errorf("create during a 529 outage: %+v", e)
	}
	for _, path := range []string{"/v1/messages/batches", "/v1/messages/batches/" + b.ID, "/v1/messages/batches/" + b.ID + "/results"} {
		// Before authentication too: the key does not matter.
		res, body := getAdmin(t, srv, path, map[string]string{"x-api-key": "sk-wrong"})
		if e := decodeError(t, res, body); res.StatusCode != 529 || e.Error.Type != "overloaded_error" || e.Error.Message != "Overloaded" {
			t.Errorf("GET %s during a 529 outage: %d %s", path, res.StatusCode, body)
		}
	}
	if res, body := post(t, srv, "/v1/messages", rawBody("hi", 10, false), nil); res.StatusCode != http.StatusOK {
		t.Errorf("messages during a batch outage: %d %s", res.StatusCode, body)
	}

	// The HTTP control, each status with its error.
	for _, tc := range []struct {
		status          int
		typ, msg, retry string
	}{
		{429, "rate_limit_error", "", "1"},
		{500, "api_error", "Internal server error", ""},
		{503, "api_error", "Service unavailable", ""},
		{529, "overloaded_error", "Overloaded", ""},
	} {
		if res, body := post(t, srv, "/_fake/batches/outage", fmt.Sprintf(`{"status":%d}`, tc.status), nil); res.StatusCode != http.StatusNoContent {
			t.Fatalf("outage %d: %d %s", tc.status, res.StatusCode, body)
		}
		res, body := post(t, srv, "/v1/messages/batches/"+b.ID+"/cancel", "", nil)
		e := decodeError(t, res, body)
		if res.StatusCode != tc.status || e.Error.Type != tc.typ || (tc.msg != "" && e.Error.Message != tc.msg) || res.Header.Get("retry-after") != tc.retry {
			t.Errorf("outage %d: %d %s retry-after %q, want %s %q retry-after %q",
				tc.status, res.StatusCode, body, res.Header.Get("retry-after"), tc.typ, tc.msg, tc.retry)
		}
	}

	// Bad controls are refused with the reason, and change nothing.
	for _, tc := range []struct{ body, want string }{
		{`{"status":418}`, "418 is not an outage"},
		{`{"status":200}`, "want 0 (none), 429, 500, 503 or 529"},
		{`{}`, "status is missing"},
		{`{"status":529,"for":"1m"}`, "unknown field"},
		{`nope`, `want {"status":529}`},
	} {
		res, body := post(t, srv, "/_fake/batches/outage", tc.body, nil)
		if e := decodeError(t, res, body); res.StatusCode != http.StatusBadRequest || e.Error.Type != "invalid_request_error" || !strings.Contains(e.Error.Message, tc.want) {
			t.Errorf("control %s: %d %s, want 400 with %q", tc.body, res.StatusCode, body, tc.want)
		}
	}
	if res, body := post(t, srv, "/v1/messages/batches/"+b.ID+"/cancel", "", nil); res.StatusCode != 529 {
		t.Errorf("after bad controls: %d %s, want the 529 outage still on", res.StatusCode, body)
	}

	// 0 ends it.
	if res, body := post(t, srv, "/_fake/batches/outage", `{"status":0}`, nil); res.StatusCode != http.StatusNoContent {
		t.Fatalf("outage 0: %d %s", res.StatusCode, body)
	}
	if got, err := client.Messages.Batches.Get(ctx, b.ID, anthropic.MessageBatchGetParams{}); err != nil || got.ID != b.ID {
		t.Errorf("after the outage: %+v %v", got, err)
	}
	fake.SetBatchOutage(503)
	fake.SetBatchOutage(0)
	if _, err := client.Messages.Batches.Get(ctx, b.ID, anthropic.MessageBatchGetParams{}); err != nil {
		t.Errorf("after SetBatchOutage(0): %v", err)
	}
}

func TestSetBatchOutagePanicsOnAStatusItCannotSend(t *testing.T) {
	fake, _ := newFake(t, fakeanthropic.Config{})
	defer func() {
		if recover() == nil {
			t.Error("SetBatchOutage(404) did not panic")
		}
	}()
	fake.SetBatchOutage(404)
}

// SetBatchDelay applies to the batches created after it; those before
// keep their end.
func TestSetBatchDelay(t *testing.T) {
	clock := newTestClock()
	fake, srv := newFake(t, fakeanthropic.Config{Clock: clock.Now, BatchDelay: time.Minute})
	client := newClient(srv)
	ctx := context.Background()
	create := func() string {
		t.Helper()
		b, err := client.Messages.Batches.New(ctx, anthropic.MessageBatchNewParams{Requests: []anthropic.MessageBatchNewParamsRequest{
			batchParams("a", testModel, "one")}})
		if err != nil {
			t.Fatal(err)
		}
		return b.ID
	}
	status := func(id string) anthropic.MessageBatchProcessingStatus {
		t.Helper()
		b, err := client.Messages.Batches.Get(ctx, id, anthropic.MessageBatchGetParams{})
		if err != nil {
			t.Fatal(err)
		}
		return b.ProcessingStatus
	}
	before := create()
	fake.SetBatchDelay(time.Hour)
	after := create()
	fake.SetBatchDelay(0)
	instant := create()
	if status(instant) != anthropic.MessageBatchProcessingStatusEnded {
		t.Errorf("a batch made with delay 0 has not ended at once")
	}
	clock.Advance(2 * time.Minute)
	if s := status(before); s != anthropic.MessageBatchProcessingStatusEnded {
		t.Errorf("batch made before SetBatchDelay: %s after 2m, want ended (its 1m delay)", s)
	}
	if s := status(after); s != anthropic.MessageBatchProcessingStatusInProgress {
		t.Errorf("batch made after SetBatchDelay(1h): %s after 2m, want in_progress", s)
	}
	clock.Advance(time.Hour)
	if s := status(after); s != anthropic.MessageBatchProcessingStatusEnded {
		t.Errorf("batch made after SetBatchDelay(1h): %s after 1h2m, want ended", s)
	}
}

// batchPage is a page of GET /v1/messages/batches.
type batchPage struct {
	Data []struct {
		ID string `json:"id"`
	} `json:"data"`
	HasMore bool    `json:"has_more"`
	FirstID *string `json:"first_id"`
	LastID  *string `json:"last_id"`
}

func (p batchPage) ids() []string {
	var ids []string
	for _, d := range p.Data {
		ids = append(ids, d.ID)
	}
	return ids
}

// The list pages as the API does: newest first, limit per page, after_id
// the older page (the SDK's auto-paging), before_id the newer one,
// has_more, first_id and last_id to match; deleted batches are skipped but
// still work as cursors.
func TestBatchListPages(t *testing.T) {
	clock := newTestClock()
	_, srv := newFake(t, fakeanthropic.Config{Clock: clock.Now})
	client := newClient(srv)
	ctx := context.Background()
	var ids []string // by creation
	for i := range 9 {
		b, err := client.Messages.Batches.New(ctx, anthropic.MessageBatchNewParams{Requests: []anthropic.MessageBatchNewParamsRequest{
			batchParams("a", testModel, "one")}})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, b.ID)
		if i != 3 { // batches 3 and 4 share a created time: the later created is newer
			clock.Advance(time.Second)
		}
	}
	if _, err := client.Messages.Batches.Delete(ctx, ids[5], anthropic.MessageBatchDeleteParams{}); err != nil {
		t.Fatal(err)
	}
	// newest first, the deleted one left out
	want := []string{ids[8], ids[7], ids[6], ids[4], ids[3], ids[2], ids[1], ids[0]}

	var got []string
	pager := client.Messages.Batches.ListAutoPaging(ctx, anthropic.MessageBatchListParams{Limit: anthropic.Int(3)})
	for pager.Next() {
		got = append(got, pager.Current().ID)
	}
	if err := pager.Err(); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, want) {
		t.Errorf("auto-paging by 3:\n got %v\nwant %v", got, want)
	}

	page := func(query string) batchPage {
		t.Helper()
		res, body := getAdmin(t, srv, "/v1/messages/batches"+query, map[string]string{"x-api-key": testKey})
		if res.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: %d %s", query, res.StatusCode, body)
		}
		var p batchPage
		if err := json.Unmarshal(body, &p); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, tc := range []struct {
		query   string
		want    []string
		hasMore bool
	}{
		{"", want, false}, // default 20
		{"?limit=8", want, false},
		{"?limit=3", want[:3], true},
		{"?limit=3&after_id=" + want[2], want[3:6], true},
		{"?limit=3&after_id=" + want[5], want[6:], false},
		{"?limit=2&after_id=" + ids[5], []string{ids[4], ids[3]}, true}, // a deleted cursor keeps its place
		{"?after_id=" + ids[0], nil, false},
		{"?limit=2&before_id=" + ids[0], []string{ids[2], ids[1]}, true}, // the newer ones nearest the cursor
		{"?limit=3&before_id=" + ids[3], []string{ids[7], ids[6], ids[4]}, true},
		{"?limit=4&before_id=" + ids[3], []string{ids[8], ids[7], ids[6], ids[4]}, false},
		{"?before_id=" + ids[8], nil, false},
	} {
		p := page(tc.query)
		if !slices.Equal(p.ids(), tc.want) || p.HasMore != tc.hasMore {
			t.Errorf("%q: %v has_more %v, want %v has_more %v", tc.query, p.ids(), p.HasMore, tc.want, tc.hasMore)
			continue
		}
		if len(tc.want) == 0 {
			if p.FirstID != nil || p.LastID != nil || p.Data == nil {
				t.Errorf("%q: empty page with first_id %v, last_id %v, data %v: want null, null, []", tc.query, p.FirstID, p.LastID, p.Data)
			}
		} else if p.FirstID == nil || *p.FirstID != tc.want[0] || p.LastID == nil || *p.LastID != tc.want[len(tc.want)-1] {
			t.Errorf("%q: first_id %v, last_id %v", tc.query, p.FirstID, p.LastID)
		}
	}

	for _, tc := range []struct{ query, want string }{
		{"?limit=0", "limit: want an integer from 1 to 1000"},
		{"?limit=1001", "limit: want an integer from 1 to 1000"},
		{"?limit=x", "limit: want an integer from 1 to 1000"},
		{"?after_id=msgbatch_nope", "after_id: no message batch msgbatch_nope"},
		{"?before_id=msgbatch_nope", "before_id: no message batch msgbatch_nope"},
		{"?after_id=" + ids[1] + "&before_id=" + ids[0], "at most one"},
	} {
		res, body := getAdmin(t, srv, "/v1/messages/batches"+tc.query, map[string]string{"x-api-key": testKey})
		if e := decodeError(t, res, body); res.StatusCode != http.StatusBadRequest || !strings.Contains(e.Error.Message, tc.want) {
			t.Errorf("%q: %d %s, want 400 with %q", tc.query, res.StatusCode, body, tc.want)
		}
	}
}
