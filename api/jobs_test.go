package api_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/jobs"
)

func TestSubmitRunsToSuccessWithEvents(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	v := e.Submit(t, harness.JobBody("alice", "Hello there [[reply_tokens=7]]"))
	if v.Status != jobs.Queued || v.Token == "" || !jobs.ValidID(v.ID) {
		t.Fatalf("created job = %+v", v)
	}
	if v.Position == nil || *v.Position < 1 || v.ETASeconds == nil {
		t.Fatalf("a queued job shows position and eta: %+v", v)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	evs := e.Events(t, ctx, v.ID, harness.TenantKey, "")
	var names []string
	var text strings.Builder
	for _, ev := range evs {
		if ev.ID == "" {
			t.Errorf("event %s has no id", ev.Event)
		}
		if len(names) == 0 || names[len(names)-1] != ev.Event {
			names = append(names, ev.Event)
		}
		if ev.Event == "delta" {
			var d struct{ Text string }
			if err := json.Unmarshal([]byte(ev.Data), &d); err != nil {
				t.Fatal(err)
			}
			text.WriteString(d.Text)
		}
	}
	if diff := cmp.Diff([]string{"queued", "started", "delta", "succeeded"}, names); diff != "" {
		t.Fatalf("event sequence (-want +got):\n%s", diff)
	}
	got := e.Get(t, v.ID)
	if got.Status != jobs.Succeeded || got.Text == nil || *got.Text != text.String() {
		t.Fatalf("job text %v, streamed %q", got.Text, text.String())
	}
	if got.Usage == nil || got.Usage.OutputTokens != 7 || got.Usage.InputTokens <= 0 {
		t.Fatalf("usage = %+v, want 7 output tokens", got.Usage)
	}
	if got.Attempts != 1 || got.StartedAt == nil || got.FinishedAt == nil || got.Position != nil {
		t.Fatalf("finished job = %+v", got)
	}
	var msg struct {
		Type    string `json:"type"`
		Role    string `json:"role"`
		Content []struct {
			Type, Text string
		} `json:"content"`
		StopReason string `json:"stop_reason"`
	}
	if err := json.Unmarshal(got.Result, &msg); err != nil {
		t.Fatal(err)
	}
	if msg.Type != "message" || msg.Role != "assistant" || len(msg.Content) != 1 || msg.Content[0].Text != *got.Text || msg.StopReason != "end_turn" {
		t.Fatalf("result = %s", got.Result)
	}
	st := e.Fake.Stats()
	if st.Requests != 1 {
		t.Fatalf("upstream requests = %d, want 1", st.Requests)
	}
	// The upstream sees an opaque user id, never the raw one.
	if u := st.Log[0].UserID; u == "" || strings.Contains(u, "alice") {
		t.Fatalf("upstream metadata.user_id = %q", u)
	}
	// A client connecting after the end gets the history and the terminal event.
	late := e.Events(t, ctx, v.ID, harness.TenantKey, "")
	if len(late) != len(evs) || late[len(late)-1].Event != "succeeded" {
		t.Fatalf("late subscriber got %d events, want %d", len(late), len(evs))
	}
	// Resume after the k-th event: exactly the rest.
	for k := 1; k < len(evs); k++ {
		rest := e.Events(t, ctx, v.ID, harness.TenantKey, evs[k-1].ID)
		if diff := cmp.Diff(evs[k:], rest); diff != "" {
			t.Fatalf("resume after event %d (-want +got):\n%s", k, diff)
		}
	}
	// The token opens the job and its events without a key.
	resp, b := e.Do(t, http.MethodGet, "/v1/jobs/"+v.ID+"?token="+v.Token, "", nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("get with token: %d %s", resp.StatusCode, b)
	}
	if strings.Contains(e.Logs(), harness.UpstreamKey) || strings.Contains(e.Logs(), harness.TenantKey) {
		t.Fatal("a secret reached the logs")
	}
}

func TestBothAuthStyles(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true})
	body, _ := json.Marshal(harness.JobBody("bob", "hi"))
	for _, h := range []struct{ name, value string }{
		{"x-api-key", harness.TenantKey},
		{"Authorization", "Bearer " + harness.TenantKey},
	} {
		req, _ := http.NewRequest(http.MethodPost, e.API.URL+"/v1/jobs", strings.NewReader(string(body)))
		req.Header.Set(h.name, h.value)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusAccepted {
			t.Errorf("%s: status %d", h.name, resp.StatusCode)
		}
		if loc := resp.Header.Get("Location"); !strings.HasPrefix(loc, "/v1/jobs/job_") {
			t.Errorf("%s: Location %q", h.name, loc)
		}
	}
}

type apiError struct {
	Error struct {
		Type    string `json:"type"`
		Message string `json:"message"`
		Field   string `json:"field"`
	} `json:"error"`
}

func TestBadInput(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true})
	mine := e.Submit(t, harness.JobBody("alice", "mine"))
	otherTenant := func() string {
		resp, b := e.Do(t, http.MethodPost, "/v1/jobs", harness.OtherTenantKey, harness.JobBody("alice", "theirs"))
		if resp.StatusCode != http.StatusAccepted {
			t.Fatalf("other tenant submit: %d %s", resp.StatusCode, b)
		}
		var v jobs.View
		_ = json.Unmarshal(b, &v)
		return v.ID
	}()
	msgs := `[{"role":"user","content":"hi"}]`
	job := func(req string) string { return `{"user_id":"u1","request":` + req + `}` }
	tests := []struct {
		name, method, path, key, body string
		status                        int
		typ, field                    string
	}{
		{"malformed JSON", "POST", "/v1/jobs", harness.TenantKey, `{"user_id": "u1", "request": {`, 400, "invalid_request", ""},
		{"not an object", "POST", "/v1/jobs", harness.TenantKey, `[1,2]`, 400, "invalid_request", ""},
		{"empty body", "POST", "/v1/jobs", harness.TenantKey, ``, 400, "invalid_request", ""},
		{"missing model", "POST", "/v1/jobs", harness.TenantKey, job(`{"max_tokens":10,"messages":` + msgs + `}`), 400, "invalid_request", "request.model"},
		{"unknown model", "POST", "/v1/jobs", harness.TenantKey, job(`{"model":"gpt-4","max_tokens":10,"messages":` + msgs + `}`), 400, "invalid_request", "request.model"},
		{"missing user_id", "POST", "/v1/jobs", harness.TenantKey, `{"request":{"model":"claude-sonnet-4-6","max_tokens":10,"messages":` + msgs + `}}`, 400, "invalid_request", "user_id"},
		{"user_id differs from metadata", "POST", "/v1/jobs", harness.TenantKey, `{"user_id":"a","request":{"model":"claude-sonnet-4-6","metadata":{"user_id":"b"},"messages":` + msgs + `}}`, 400, "invalid_request", "user_id"},
		{"user_id control char", "POST", "/v1/jobs", harness.TenantKey, `{"user_id":"a\u0007b","request":{"model":"claude-sonnet-4-6","messages":` + msgs + `}}`, 400, "invalid_request", "user_id"},
		{"user_id too long", "POST", "/v1/jobs", harness.TenantKey, `{"user_id":"` + strings.Repeat("x", 257) + `","request":{"model":"claude-sonnet-4-6","messages":` + msgs + `}}`, 400, "invalid_request", "user_id"},
		{"max_tokens zero", "POST", "/v1/jobs", harness.TenantKey, job(`{"model":"claude-sonnet-4-6","max_tokens":0,"messages":` + msgs + `}`), 400, "invalid_request", "request.max_tokens"},
		{"max_tokens negative", "POST", "/v1/jobs", harness.TenantKey, job(`{"model":"claude-sonnet-4-6","max_tokens":-5,"messages":` + msgs + `}`), 400, "invalid_request", "request.max_tokens"},
		{"max_tokens 2^63", "POST", "/v1/jobs", harness.TenantKey, job(`{"model":"claude-sonnet-4-6","max_tokens":9223372036854775808,"messages":` + msgs + `}`), 400, "invalid_request", "request.max_tokens"},
		{"max_tokens fraction", "POST", "/v1/jobs", harness.TenantKey, job(`{"model":"claude-sonnet-4-6","max_tokens":1.5,"messages":` + msgs + `}`), 400, "invalid_request", "request.max_tokens"},
		{"empty messages", "POST", "/v1/jobs", harness.TenantKey, job(`{"model":"claude-sonnet-4-6","max_tokens":10,"messages":[]}`), 400, "invalid_request", "request.messages"},
		{"missing messages", "POST", "/v1/jobs", harness.TenantKey, job(`{"model":"claude-sonnet-4-6","max_tokens":10}`), 400, "invalid_request", "request.messages"},
		{"bad role", "POST", "/v1/jobs", harness.TenantKey, job(`{"model":"claude-sonnet-4-6","messages":[{"role":"system","content":"x"}]}`), 400, "invalid_request", "request.messages[0].role"},
		{"stream true", "POST", "/v1/jobs", harness.TenantKey, job(`{"model":"claude-sonnet-4-6","stream":true,"messages":` + msgs + `}`), 400, "invalid_request", "request.stream"},
		{"unknown field", "POST", "/v1/jobs", harness.TenantKey, `{"user_id":"u","colour":"red","request":{"model":"claude-sonnet-4-6","messages":` + msgs + `}}`, 400, "invalid_request", "colour"},
		{"negative deadline", "POST", "/v1/jobs", harness.TenantKey, `{"user_id":"u","deadline_seconds":-1,"request":{"model":"claude-sonnet-4-6","messages":` + msgs + `}}`, 400, "invalid_request", "deadline_seconds"},
		{"invalid UTF-8", "POST", "/v1/jobs", harness.TenantKey, "{\"user_id\":\"\xff\xfe\",\"request\":{}}", 400, "invalid_request", ""},
		{"deeply nested", "POST", "/v1/jobs", harness.TenantKey, strings.Repeat("[", 20000) + strings.Repeat("]", 20000), 400, "invalid_request", ""},
		{"body over limit", "POST", "/v1/jobs", harness.TenantKey, job(`{"model":"claude-sonnet-4-6","messages":[{"role":"user","content":"` + strings.Repeat("a", 70000) + `"}]}`), 413, "request_too_large", ""},
		{"no key", "POST", "/v1/jobs", "", job(`{}`), 401, "authentication_error", ""},
		{"wrong key", "POST", "/v1/jobs", "sk-wrong-key-0000000000", job(`{}`), 401, "authentication_error", ""},
		{"no key on get", "GET", "/v1/jobs/" + mine.ID, "", "", 401, "authentication_error", ""},
		{"unknown job", "GET", "/v1/jobs/job_aaaaaaaaaaaaaaaaaaaaaaaaaa", harness.TenantKey, "", 404, "not_found", ""},
		{"malformed job id", "GET", "/v1/jobs/nope", harness.TenantKey, "", 404, "not_found", ""},
		{"another tenant's job", "GET", "/v1/jobs/" + otherTenant, harness.TenantKey, "", 404, "not_found", ""},
		{"another tenant's events", "GET", "/v1/jobs/" + otherTenant + "/events", harness.TenantKey, "", 404, "not_found", ""},
		{"another user's job", "GET", "/v1/jobs/" + mine.ID + "?user_id=mallory", harness.TenantKey, "", 404, "not_found", ""},
		{"wrong token", "GET", "/v1/jobs/" + mine.ID + "?token=jt_nope", "", "", 404, "not_found", ""},
		{"bad Last-Event-ID", "GET", "/v1/jobs/" + mine.ID + "/events?last_event_id=x", harness.TenantKey, "", 400, "invalid_request", "last_event_id"},
		{"unknown route", "GET", "/v1/nothing", harness.TenantKey, "", 404, "not_found", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var body any
			if tc.method == "POST" {
				body = tc.body
			}
			resp, b := e.Do(t, tc.method, tc.path, tc.key, body)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, b)
			}
			var got apiError
			if err := json.Unmarshal(b, &got); err != nil {
				t.Fatalf("error body is not JSON: %s", b)
			}
			if got.Error.Type != tc.typ || got.Error.Field != tc.field {
				t.Fatalf("error = %+v, want type %q field %q", got.Error, tc.typ, tc.field)
			}
			if len(got.Error.Message) < 20 || strings.Contains(got.Error.Message, fmt.Sprint(tc.status)) {
				t.Fatalf("message should be a sentence, not a status: %q", got.Error.Message)
			}
		})
	}
	// The owner, and the owner naming the right user, still see it.
	for _, path := range []string{"/v1/jobs/" + mine.ID, "/v1/jobs/" + mine.ID + "?user_id=alice"} {
		if resp, b := e.Do(t, "GET", path, harness.TenantKey, nil); resp.StatusCode != 200 {
			t.Fatalf("%s: %d %s", path, resp.StatusCode, b)
		}
	}
}

func TestDefaultMaxTokensAndUserFromMetadata(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true})
	v := e.Submit(t, map[string]any{"request": map[string]any{
		"model": harness.Model, "metadata": map[string]any{"user_id": "carol"},
		"messages": []any{map[string]any{"role": "user", "content": "hi"}},
	}})
	if v.UserID != "carol" || v.MaxTokens != 1024 {
		t.Fatalf("user %q max_tokens %d, want carol and the default 1024", v.UserID, v.MaxTokens)
	}
}

func TestInputReservation(t *testing.T) {
	for _, exact := range []bool{false, true} {
		t.Run(fmt.Sprint("count_tokens=", exact), func(t *testing.T) {
			o := harness.Options{NoWorker: true}
			if exact {
				o.GroupExtra = "    count_tokens: true\n"
			}
			e := harness.Start(t, o)
			body := harness.JobBody("alice", strings.Repeat("How do token buckets work? ", 40))
			v := e.Submit(t, body)
			j, err := e.Store.Get(context.Background(), v.ID)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := json.Marshal(body["request"])
			real, _ := fakeanthropic.CountTokens(b)
			if exact {
				if j.CostIn != real || e.Fake.Stats().CountTokensRequests != 1 {
					t.Fatalf("reserved %d input tokens, the upstream counts %d", j.CostIn, real)
				}
				return
			}
			if j.CostIn < real || j.CostIn > 2*real {
				t.Fatalf("estimated %d input tokens for a real %d: want conservative, not wild", j.CostIn, real)
			}
		})
	}
}
