package fakeanthropic_test

import (
	"encoding/json"
	"maps"
	"net/http"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/sluice-dev/sluice/fakeanthropic"
)

func getStats(t testing.TB, srvURL string, client *http.Client, query string) (map[string]json.RawMessage, fakeanthropic.Stats) {
	t.Helper()
	res, err := client.Get(srvURL + "/_fake/stats" + query)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	if res.StatusCode != 200 || res.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("GET /_fake/stats: status %d, content-type %q", res.StatusCode, res.Header.Get("Content-Type"))
	}
	var raw map[string]json.RawMessage
	if err := json.NewDecoder(res.Body).Decode(&raw); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(raw)
	var st fakeanthropic.Stats
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	return raw, st
}

func TestStatsEndpoint(t *testing.T) {
	clk := newTestClock()
	_, srv := newFake(t, fakeanthropic.Config{Groups: oneGroup(2, 30_000, 8_000), Clock: clk.Now})
	post(t, srv, "/v1/messages", rawBody("hi [[reply_tokens=3]]", 10, false), nil)
	post(t, srv, "/v1/messages", rawBody("hi [[reply_tokens=4]]", 10, true), nil)
	post(t, srv, "/v1/messages", rawBody("hi", 10, false), nil)                                // 429
	post(t, srv, "/v1/messages", rawBody("hi", 10, false), map[string]string{"x-api-key": ""}) // 401

	raw, st := getStats(t, srv.URL, srv.Client(), "")
	wantKeys := []string{"admitted_cache_creation_input_tokens", "admitted_cache_read_input_tokens", "admitted_input_tokens",
		"admitted_output_tokens", "admitted_requests", "batch_requests", "batches", "by_status", "cache_entries", "cache_write_requests",
		"count_tokens_requests", "dropped", "in_flight", "log", "max_in_flight", "max_in_flight_by_group", "rate_limited", "requests"}
	if diff := cmp.Diff(wantKeys, slices.Sorted(maps.Keys(raw))); diff != "" {
		t.Errorf("stats keys (-want +got):\n%s", diff)
	}
	var firstRecord map[string]json.RawMessage
	var records []json.RawMessage
	_ = json.Unmarshal(raw["log"], &records)
	_ = json.Unmarshal(records[0], &firstRecord)
	wantRecordKeys := []string{"at", "cache_creation_input_tokens", "cache_read_input_tokens", "complete", "group",
		"input_tokens", "model", "output_tokens", "status", "stream"}
	if diff := cmp.Diff(wantRecordKeys, slices.Sorted(maps.Keys(firstRecord))); diff != "" {
		t.Errorf("log record keys (-want +got):\n%s", diff)
	}

	// "hi [[reply_tokens=3]]" counts 8 + 4 + ceil(21/4) = 18 tokens.
	want := fakeanthropic.Stats{
		Requests:             4,
		ByStatus:             map[int]int64{200: 2, 401: 1, 429: 1},
		RateLimited:          1,
		MaxInFlight:          1,
		MaxInFlightByGroup:   map[string]int64{"claude": 1},
		AdmittedInputTokens:  map[string]int64{"claude": 36},
		AdmittedOutputTokens: map[string]int64{"claude": 7},
		AdmittedRequests:     map[string]int64{"claude": 2},

		AdmittedCacheReadTokens:     map[string]int64{"claude": 0},
		AdmittedCacheCreationTokens: map[string]int64{"claude": 0},
		CacheWriteRequests:          map[string]int64{"claude": 0},
		Log: []fakeanthropic.RequestRecord{
			{At: clk.Now(), Group: "claude", Model: testModel, Status: 200, InputTokens: 18, OutputTokens: 3, Complete: true},
			{At: clk.Now(), Group: "claude", Model: testModel, Status: 200, Stream: true, InputTokens: 18, OutputTokens: 4, Complete: true},
			{At: clk.Now(), Group: "claude", Model: testModel, Status: 429, InputTokens: 13},
			{At: clk.Now(), Status: 401},
		},
	}
	if diff := cmp.Diff(want, st); diff != "" {
		t.Errorf("stats (-want +got):\n%s", diff)
	}

	if _, st := getStats(t, srv.URL, srv.Client(), "?log=1"); len(st.Log) != 1 || st.Log[0].Status != 401 {
		t.Errorf("?log=1: log %+v, want the last record only", st.Log)
	}
	if _, st := getStats(t, srv.URL, srv.Client(), "?log=0"); len(st.Log) != 0 || st.Requests != 4 {
		t.Errorf("?log=0: %+v, want counters without log", st)
	}

	res, err := srv.Client().Post(srv.URL+"/_fake/reset", "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusNoContent {
		t.Errorf("POST /_fake/reset: status %d, want 204", res.StatusCode)
	}
	_, st = getStats(t, srv.URL, srv.Client(), "")
	zero := fakeanthropic.Stats{
		ByStatus:             map[int]int64{},
		MaxInFlightByGroup:   map[string]int64{"claude": 0},
		AdmittedInputTokens:  map[string]int64{"claude": 0},
		AdmittedOutputTokens: map[string]int64{"claude": 0},
		AdmittedRequests:     map[string]int64{"claude": 0},

		AdmittedCacheReadTokens:     map[string]int64{"claude": 0},
		AdmittedCacheCreationTokens: map[string]int64{"claude": 0},
		CacheWriteRequests:          map[string]int64{"claude": 0},
		Log:                         []fakeanthropic.RequestRecord{},
	}
	if diff := cmp.Diff(zero, st); diff != "" {
		t.Errorf("stats after reset (-want +got):\n%s", diff)
	}
	// Reset leaves the buckets alone: still no room this minute.
	if res, _ := post(t, srv, "/v1/messages", rawBody("hi", 10, false), nil); res.StatusCode != 429 {
		t.Errorf("after reset: status %d, want 429 (buckets untouched)", res.StatusCode)
	}
}

func TestFaultsEndpoint(t *testing.T) {
	_, srv := newFake(t, fakeanthropic.Config{})
	res, b := post(t, srv, "/_fake/faults", `{"faults":[{"kind":"overloaded"},{"kind":"rate_limit","retry_after_seconds":2}]}`, nil)
	if res.StatusCode != 200 || string(b) != `{"queued":2}` {
		t.Fatalf("POST /_fake/faults: %d %s, want 200 {\"queued\":2}", res.StatusCode, b)
	}
	client := newClient(srv)
	_, err := client.Messages.New(ctxWithTimeout(t), userParams("hi", 10))
	if got := asSDKError(t, err); got.Status != 529 {
		t.Errorf("first call: %+v, want 529", got)
	}
	_, err = client.Messages.New(ctxWithTimeout(t), userParams("hi", 10))
	if got := asSDKError(t, err); got.Status != 429 || got.RetryAfter != "2" {
		t.Errorf("second call: %+v, want 429 with retry-after 2", got)
	}
	if _, err := client.Messages.New(ctxWithTimeout(t), userParams("hi", 10)); err != nil {
		t.Errorf("third call: %v", err)
	}

	for _, body := range []string{
		`{"faults":[{"kind":"gremlins"}]}`,
		`{"faults":[{"kind":"overloaded","retry_after_seconds":-1}]}`,
		`{"faults":[{"kind":"overloaded","rate":0.5,"extra":1}]}`,
		`not json`,
	} {
		res, b := post(t, srv, "/_fake/faults", body, nil)
		if res.StatusCode != 400 {
			t.Errorf("POST /_fake/faults %s: status %d, want 400", body, res.StatusCode)
			continue
		}
		decodeError(t, res, b)
	}
}

func TestControlRoutesNeedTheirMethod(t *testing.T) {
	_, srv := newFake(t, fakeanthropic.Config{})
	res, err := srv.Client().Post(srv.URL+"/_fake/stats", "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusNotFound {
		t.Errorf("POST /_fake/stats: status %d, want 404", res.StatusCode)
	}
}
