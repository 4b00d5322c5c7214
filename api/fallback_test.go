package api_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/anthropics/anthropic-sdk-go/v2"
	"github.com/anthropics/anthropic-sdk-go/v2/option"

	"github.com/sluice-dev/sluice/api"
	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/rkeys"
	"github.com/sluice-dev/sluice/jobs"
)

// haikuModel is the model of the harness's second group in these tests.
const haikuModel = "claude-haiku-4-5"

// haikuGroup is a roomy second model group.
const haikuGroup = `  - name: haiku
    models: ["` + haikuModel + `", "claude-haiku-*"]
    rpm: 6000
    input_tpm: 10000000
    output_tpm: 10000000
`

// fakeGroups are the fake upstream's groups: sonnet and haiku.
var fakeGroups = []fakeanthropic.Group{
	{Name: "sonnet", Models: []string{"claude-sonnet-*"}, RPM: 100000, InputTPM: 100000000, OutputTPM: 100000000},
	{Name: "haiku", Models: []string{"claude-haiku-*"}, RPM: 100000, InputTPM: 100000000, OutputTPM: 100000000},
}

// busyEnv runs sluice with groups sonnet and haiku, tenant acme waiting at
// most 30 s with the fallback rules given (YAML list items indented 6
// spaces, "" for none), and sonnet slowed to one request a minute with one
// job already queued: a second job there would wait about a minute, so
// sonnet refuses it as overloaded. Its worker is started only then (the
// config is not changed under a running worker).
func busyEnv(t *testing.T, rules string, tenantExtra ...string) (*harness.Env, jobs.View) {
	t.Helper()
	extra := "    max_wait: 30s\n" + strings.Join(tenantExtra, "")
	if rules != "" {
		extra += "    fallbacks:\n" + rules
	}
	e := harness.Start(t, harness.Options{NoWorker: true, TenantExtra: extra, Groups: haikuGroup,
		Fake: fakeanthropic.Config{Groups: fakeGroups}})
	e.Config.ModelGroups[0].RPM = 1
	first := e.Submit(t, harness.JobBody("first", "hello")) // takes sonnet's only request this minute
	return e, first
}

// submitWith posts a job body with an Idempotency-Key (none when "").
func submitWith(t *testing.T, e *harness.Env, body any, key string) (*http.Response, []byte) {
	t.Helper()
	if key == "" {
		return e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, body)
	}
	b, _ := json.Marshal(body)
	req, _ := http.NewRequest(http.MethodPost, e.API.URL+"/v1/jobs", strings.NewReader(string(b)))
	req.Header.Set("x-api-key", harness.TenantKey)
	req.Header.Set("Idempotency-Key", key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, out
}

// admitted submits a job body that must be accepted, and returns its view.
func admitted(t *testing.T, e *harness.Env, body any, key string) jobs.View {
	t.Helper()
	resp, b := submitWith(t, e, body, key)
	return view(t, resp, b)
}

func view(t *testing.T, resp *http.Response, b []byte) jobs.View {
	t.Helper()
	var v jobs.View
	if resp.StatusCode != http.StatusAccepted || json.Unmarshal(b, &v) != nil {
		t.Fatalf("want 202 and a job: %d %s", resp.StatusCode, b)
	}
	return v
}

// queuedData is the data of a job's queued event.
type queuedData struct {
	Position       int    `json:"position"`
	RequestedModel string `json:"requested_model"`
	FallbackFrom   string `json:"fallback_from"`
	FallbackReason string `json:"fallback_reason"`
}

func TestFallbackOnWait(t *testing.T) {
	e, _ := busyEnv(t, "      - {from: sonnet, to: [haiku], when: [on_wait]}\n")
	v := admitted(t, e, harness.JobBody("alice", "Hello [[reply_tokens=4]]"), "")
	if v.Model != haikuModel || v.RequestedModel != harness.Model || v.FallbackReason != "on_wait" || v.Position == nil || *v.Position != 1 {
		t.Fatalf("the job did not fall back to haiku: %+v", v)
	}
	if j, err := e.Store.Get(context.Background(), v.ID); err != nil || j.Group != "haiku" || j.FallbackFrom != "sonnet" {
		t.Fatalf("stored job: %+v %v", j, err)
	}
	e.Worker = harness.StartWorker(t, e)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	evs := e.Events(t, ctx, v.ID, harness.TenantKey, "")
	var q queuedData
	if len(evs) == 0 || evs[0].Event != "queued" || json.Unmarshal([]byte(evs[0].Data), &q) != nil {
		t.Fatalf("events: %+v", evs)
	}
	if q != (queuedData{Position: 1, RequestedModel: harness.Model, FallbackFrom: "sonnet", FallbackReason: "on_wait"}) {
		t.Fatalf("queued event: %s", evs[0].Data)
	}
	if last := evs[len(evs)-1]; last.Event != "succeeded" {
		t.Fatalf("the job did not succeed: %+v", last)
	}
	got := e.Get(t, v.ID)
	if got.Status != jobs.Succeeded || got.Model != haikuModel || got.RequestedModel != harness.Model {
		t.Fatalf("finished job: %+v", got)
	}
	var result struct{ Model string }
	if json.Unmarshal(got.Result, &result) != nil || result.Model != haikuModel {
		t.Fatalf("the answer is not the fallback model's: %s", got.Result)
	}
	// The upstream was asked for the fallback model, in its own group.
	harness.Eventually(t, 10*time.Second, func() bool { return len(e.Fake.Stats().Log) == 2 }, "both jobs to reach the upstream")
	models := map[string]string{}
	for _, r := range e.Fake.Stats().Log {
		models[r.Model] = r.Group
	}
	if models[haikuModel] != "haiku" || models[harness.Model] != "sonnet" {
		t.Fatalf("upstream calls by model: %v", models)
	}
	page := scrape(t, e)
	if n := metric(page, `sluice_fallbacks_total{from="sonnet",reason="on_wait",to="haiku"}`); n != 1 {
		t.Errorf("sluice_fallbacks_total = %v, want 1", n)
	}
	if n := metric(page, `sluice_admissions_total{group="sonnet",outcome="overloaded"}`); n != 1 {
		t.Errorf("sonnet's refusal counted %v times, want 1", n)
	}
	if n := metric(page, `sluice_admissions_total{group="haiku",outcome="admitted"}`); n != 1 {
		t.Errorf("haiku's admission counted %v times, want 1", n)
	}
}

// A job that falls back is charged in quotas and budgets once, as the
// job it is: the refusal gave back what its own group's admission held,
// and the fallback's admission held the fallback model's worst case.
func TestFallbackChargesOnce(t *testing.T) {
	e, _ := busyEnv(t, "      - {from: sonnet, to: [haiku], when: [on_wait]}\n",
		"    requests_per_hour: 10\n    tokens_per_hour: 100000\n    budget_usd_per_day: 10\n")
	start := time.Now()
	reqBefore, tokBefore := quotaLeft(t, e)
	v := admitted(t, e, budgetBody("alice", "hello"), "")
	if v.Model != haikuModel {
		t.Fatalf("did not fall back: %+v", v)
	}
	j, err := e.Store.Get(context.Background(), v.ID)
	if err != nil {
		t.Fatal(err)
	}
	req, tok := quotaLeft(t, e)
	// The token bucket refills 100,000 an hour meanwhile (the clock runs:
	// the busy group needs it): what it gained is allowed for.
	refill := int(time.Since(start).Seconds()*100000/3600) + 1
	if charged, want := tokBefore-tok, j.CostIn+1000; reqBefore-req != 1 || charged > want || charged < want-refill {
		t.Fatalf("quota charged %d requests and %d tokens; want 1 and %d (the fallback job's hold, less up to %d refilled)", reqBefore-req, charged, want, refill)
	}
	// Haiku 4.5: $1 and $5 per million input and output tokens; sonnet's
	// hold ($15 per million output) would be three times as much.
	want := int64(j.CostIn) + 5*1000
	if got := counter(t, e, rkeys.UserBudget("acme", "alice", "d", time.Now().UTC().Format("20060102"))); got != want {
		t.Fatalf("the budget holds %d µ$, want %d: the fallback model's worst case only", got, want)
	}
}

// Without a rule, with fallback off, with a rule for another reason, or
// with the fallback's own wait too long, the refusal is today's 503.
func TestNoFallbackIsTodaysRefusal(t *testing.T) {
	off := harness.JobBody("alice", "hi")
	off["fallback"] = false
	for _, tc := range []struct {
		name, rules string
		body        map[string]any
	}{
		{"no rule", "", harness.JobBody("alice", "hi")},
		{"fallback false", "      - {from: sonnet, to: [haiku], when: [on_wait]}\n", off},
		{"rule for outages only", "      - {from: sonnet, to: [haiku], when: [on_outage]}\n", harness.JobBody("alice", "hi")},
		{"rule off", "      - {from: sonnet, to: [haiku], when: [never]}\n", harness.JobBody("alice", "hi")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, _ := busyEnv(t, tc.rules)
			resp, b := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, tc.body)
			eb := decodeErr(t, b)
			if resp.StatusCode != 503 || eb.Error.Type != "overloaded" || resp.Header.Get("Retry-After") == "" || !strings.Contains(eb.Error.Message, "longer than the 30 seconds allowed") {
				t.Fatalf("%d %s", resp.StatusCode, b)
			}
		})
	}
	t.Run("fallback busy too", func(t *testing.T) {
		e, _ := busyEnv(t, "      - {from: sonnet, to: [haiku], when: [on_wait]}\n")
		e.Config.ModelGroups[1].RPM = 1
		e.Submit(t, harness.JobBody("second", "hello")) // falls back, and takes haiku's only request
		resp, b := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, harness.JobBody("alice", "hi"))
		eb := decodeErr(t, b)
		if resp.StatusCode != 503 || eb.Error.Type != "overloaded" || !strings.Contains(eb.Error.Message, "longer than the 30 seconds allowed") {
			t.Fatalf("%d %s", resp.StatusCode, b)
		}
		if n, _ := e.Sched.QueueLength(context.Background(), "haiku"); n != 1 {
			t.Fatalf("haiku holds %d jobs, want 1", n)
		}
	})
}

// A request may name its own order (group or model names), used instead
// of the rule's, and even with no rule; bad values are refused naming the
// field.
func TestRequestFallbackOrder(t *testing.T) {
	e, _ := busyEnv(t, "")
	body := harness.JobBody("alice", "hi")
	body["fallback"] = []string{"claude-haiku-4-5-20251001"}
	v := admitted(t, e, body, "")
	if v.Model != "claude-haiku-4-5-20251001" || v.RequestedModel != harness.Model {
		t.Fatalf("the request's own order: %+v", v)
	}
	j, err := e.Store.Get(context.Background(), v.ID)
	var sent struct{ Model string }
	if err != nil || json.Unmarshal(j.Request, &sent) != nil || sent.Model != "claude-haiku-4-5-20251001" || j.Group != "haiku" {
		t.Fatalf("stored request %s (group %s, %v)", j.Request, j.Group, err)
	}

	for _, tc := range []struct {
		value any
		want  string
	}{
		{"haiku", "fallback must be true"},
		{42, "fallback must be true"},
		{[]any{"haiku", 3}, "fallback must be true"},
		{[]string{"gpt-4"}, `fallback[0] is "gpt-4", which is neither a model group nor a model served here`},
		{[]string{"sonnet"}, `fallback[0] is "sonnet", which is served by the model group "sonnet" that the request's own model is in`},
		{[]string{"claude-haiku-4-5", "claude-opus-4-1"}, `fallback[1] is "claude-opus-4-1", which is neither`},
		{[]string{"claude-sonnet-4-5"}, `which is served by the model group "sonnet"`},
		{[]string{"haiku", haikuModel}, `fallback names the model group "haiku" twice`},
	} {
		body := harness.JobBody("alice", "hi")
		body["fallback"] = tc.value
		resp, b := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, body)
		eb := decodeErr(t, b)
		if resp.StatusCode != 400 || eb.Error.Type != "invalid_request" || eb.Error.Field != "fallback" || !strings.Contains(eb.Error.Message, tc.want) {
			t.Errorf("fallback %v: %d %s", tc.value, resp.StatusCode, b)
		}
	}
	body = harness.JobBody("alice", "hi")
	body["fallbacks"] = true
	if resp, b := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, body); resp.StatusCode != 400 || !strings.Contains(string(b), "metadata and fallback") {
		t.Errorf("unknown field: %d %s", resp.StatusCode, b)
	}
}

// A request's order wins over the rule's.
func TestRequestOrderBeatsTheRule(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true, TenantExtra: "    max_wait: 30s\n    fallbacks:\n      - {from: sonnet, to: [haiku, opus], when: [on_wait]}\n",
		Groups: haikuGroup + "  - name: opus\n    models: [\"claude-opus-4-1\"]\n    rpm: 6000\n    input_tpm: 10000000\n    output_tpm: 10000000\n",
		Fake:   fakeanthropic.Config{Groups: fakeGroups}})
	e.Config.ModelGroups[0].RPM = 1
	e.Submit(t, harness.JobBody("first", "hello"))
	if v := admitted(t, e, harness.JobBody("alice", "hi"), ""); v.Model != haikuModel {
		t.Fatalf("the rule's first fallback: %+v", v)
	}
	body := harness.JobBody("bob", "hi")
	body["fallback"] = []string{"opus", "haiku"}
	if v := admitted(t, e, body, ""); v.Model != "claude-opus-4-1" || v.RequestedModel != harness.Model {
		t.Fatalf("the request's order: %+v", v)
	}
}

// An Idempotency-Key names one job whichever group took it: a retry while
// the primary group is still busy, and one after it has room again, both
// return the job that fell back; another body under the key is a conflict.
func TestFallbackIdempotencyKey(t *testing.T) {
	e, first := busyEnv(t, "      - {from: sonnet, to: [haiku], when: [on_wait]}\n")
	body := harness.JobBody("alice", "Hello")
	v1 := admitted(t, e, body, "k1")
	if v1.Model != haikuModel {
		t.Fatalf("did not fall back: %+v", v1)
	}
	resp, b := submitWith(t, e, body, "k1")
	if v2 := view(t, resp, b); v2.ID != v1.ID || v2.Token != v1.Token || resp.Header.Get("Idempotent-Replayed") != "true" || v2.Model != haikuModel {
		t.Fatalf("retry while sonnet is busy: %+v, want job %s", v2, v1.ID)
	}
	// Sonnet has room again (its queued job canceled): a retry must
	// still not make a second job.
	if resp, b := e.Do(t, http.MethodDelete, "/v1/jobs/"+first.ID, harness.TenantKey, nil); resp.StatusCode != http.StatusOK {
		t.Fatalf("cancel: %d %s", resp.StatusCode, b)
	}
	resp, b = submitWith(t, e, body, "k1")
	if v3 := view(t, resp, b); v3.ID != v1.ID || resp.Header.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("retry once sonnet has room: %+v, want job %s", v3, v1.ID)
	}
	if v := admitted(t, e, harness.JobBody("carol", "hi"), ""); v.Model != harness.Model {
		t.Fatalf("sonnet had room for the retry, so it takes new work: %+v", v)
	}
	resp, b = submitWith(t, e, harness.JobBody("alice", "something else"), "k1")
	if eb := decodeErr(t, b); resp.StatusCode != 409 || eb.Error.Type != "conflict" {
		t.Fatalf("another body under the key: %d %s", resp.StatusCode, b)
	}
	for g, want := range map[string]int64{"sonnet": 1, "haiku": 1} {
		if n, _ := e.Sched.QueueLength(context.Background(), g); n != want {
			t.Errorf("%s holds %d jobs, want %d", g, n, want)
		}
	}
}

// on_outage: a group whose outage outlasted max_outage sends new work to
// its fallback; a rule for waits only does not.
func TestFallbackOnOutage(t *testing.T) {
	for _, when := range []string{"on_outage", "on_wait"} {
		t.Run(when, func(t *testing.T) {
			e := harness.Start(t, harness.Options{Groups: haikuGroup, Fake: fakeanthropic.Config{Groups: fakeGroups},
				// One failure starts an outage, whose first probe is an
				// hour away: it lasts the test.
				GroupExtra:    "    outage_failures: 1\n    probe_interval: 1h\n    probe_interval_max: 1h\n",
				UpstreamExtra: "  max_outage: 200ms\n",
				TenantExtra:   fmt.Sprintf("    fallbacks:\n      - {from: sonnet, to: [haiku], when: [%s]}\n", when)})
			e.Fake.QueueFaults(fakeanthropic.FaultRule{Kind: fakeanthropic.FaultOverloaded})
			first := e.Submit(t, harness.JobBody("first", "hello"))
			if first.Model != harness.Model {
				t.Fatalf("a healthy sonnet took its own job elsewhere: %+v", first)
			}
			harness.Eventually(t, 10*time.Second, func() bool {
				g, err := e.Sched.Gauges(context.Background(), &e.Config.ModelGroups[0])
				return err == nil && g.Outage != nil && time.Since(g.Outage.Since) > 400*time.Millisecond
			}, "sonnet's outage to outlast max_outage")
			resp, b := e.Do(t, http.MethodPost, "/v1/jobs", harness.TenantKey, harness.JobBody("alice", "Hello [[reply_tokens=3]]"))
			if when == "on_wait" {
				if eb := decodeErr(t, b); resp.StatusCode != 503 || eb.Error.Type != "upstream_unavailable" {
					t.Fatalf("a rule for waits only fell back in an outage: %d %s", resp.StatusCode, b)
				}
				return
			}
			v := view(t, resp, b)
			if v.Model != haikuModel || v.RequestedModel != harness.Model || v.FallbackReason != "on_outage" {
				t.Fatalf("did not fall back: %+v", v)
			}
			if got := e.WaitTerminal(t, v.ID, 20*time.Second); got.Status != jobs.Succeeded {
				t.Fatalf("the fallback job: %+v", got)
			}
			page := scrape(t, e)
			if n := metric(page, `sluice_fallbacks_total{from="sonnet",reason="on_outage",to="haiku"}`); n != 1 {
				t.Errorf("sluice_fallbacks_total = %v, want 1", n)
			}
		})
	}
}

// /v1/messages takes the fallback from the sluice-fallback header; the
// answer names the model that gave it.
func TestMessagesFallbackHeader(t *testing.T) {
	e, _ := busyEnv(t, "")
	e.Worker = harness.StartWorker(t, e)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	client := sdkClient(e)
	msg, err := client.Messages.New(ctx, params("alice", "Hello [[reply_tokens=4]]", 100), option.WithHeader("sluice-fallback", "haiku"))
	if err != nil {
		t.Fatal(err)
	}
	if string(msg.Model) != haikuModel || len(strings.Fields(msg.Content[0].Text)) != 4 {
		t.Fatalf("message %+v", msg)
	}
	stream := client.Messages.NewStreaming(ctx, params("alice", "Hi [[reply_tokens=3]]", 100), option.WithHeader("sluice-fallback", " claude-haiku-4-5-20251001 "))
	var acc anthropic.Message
	for stream.Next() {
		if err := acc.Accumulate(stream.Current()); err != nil {
			t.Fatal(err)
		}
	}
	if err := stream.Err(); err != nil || string(acc.Model) != "claude-haiku-4-5-20251001" {
		t.Fatalf("streamed %+v: %v", acc, err)
	}
	// Off, or no header and no rule: the API's overloaded error.
	for _, h := range []string{"false", ""} {
		opts := []option.RequestOption{}
		if h != "" {
			opts = append(opts, option.WithHeader("sluice-fallback", h))
		}
		_, err = client.Messages.New(ctx, params("alice", "hi", 100), opts...)
		var apiErr *anthropic.Error
		if !errors.As(err, &apiErr) || apiErr.StatusCode != 529 || !strings.Contains(apiErr.Error(), "overloaded_error") {
			t.Fatalf("header %q: %v", h, err)
		}
	}
	_, err = client.Messages.New(ctx, params("alice", "hi", 100), option.WithHeader("sluice-fallback", "gpt-4"))
	var apiErr *anthropic.Error
	if !errors.As(err, &apiErr) || apiErr.StatusCode != 400 || !strings.Contains(apiErr.Error(), "sluice-fallback[0] is") || !strings.Contains(apiErr.Error(), "neither a model group nor a model served here") {
		t.Fatalf("bad header: %v", err)
	}
}

// A retry that races a falling-back request (sent after the requested
// group refused it, admitted there because it had room by then) makes the
// two one job: the fallback job is withdrawn and the request answers the
// retry's.
func TestFallbackIdempotencyRace(t *testing.T) {
	e, first := busyEnv(t, "      - {from: sonnet, to: [haiku], when: [on_wait]}\n", "    requests_per_hour: 10\n")
	body := harness.JobBody("alice", "Hello")
	var retry jobs.View
	api.SetFallbackAdmitted(func() {
		api.SetFallbackAdmitted(nil)
		if resp, b := e.Do(t, http.MethodDelete, "/v1/jobs/"+first.ID, harness.TenantKey, nil); resp.StatusCode != http.StatusOK {
			t.Errorf("cancel: %d %s", resp.StatusCode, b)
		}
		retry = admitted(t, e, body, "k1")
	})
	t.Cleanup(func() { api.SetFallbackAdmitted(nil) })
	resp, b := submitWith(t, e, body, "k1")
	v := view(t, resp, b)
	if retry.Model != harness.Model || v.ID != retry.ID || resp.Header.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("the request answered %+v; the retry made %+v", v, retry)
	}
	if n, _ := e.Sched.QueueLength(context.Background(), "haiku"); n != 0 {
		t.Errorf("haiku still holds %d jobs", n)
	}
	_, lb := e.Do(t, http.MethodGet, "/v1/jobs?user_id=alice", harness.TenantKey, nil)
	var page struct{ Jobs []jobs.View }
	if err := json.Unmarshal(lb, &page); err != nil {
		t.Fatal(err)
	}
	statuses := map[string]jobs.Status{}
	for _, j := range page.Jobs {
		statuses[j.Model] = j.Status
	}
	if statuses[haikuModel] != jobs.Canceled || statuses[harness.Model] != jobs.Queued || len(page.Jobs) != 2 {
		t.Errorf("alice's jobs: %s", lb)
	}
	// The withdrawn job's request came back: one request is charged.
	if req, _ := quotaLeft(t, e); req != 9 {
		t.Errorf("alice has %d requests left, want 9", req)
	}
	if again := admitted(t, e, body, "k1"); again.ID != retry.ID {
		t.Errorf("a later retry: %+v, want job %s", again, retry.ID)
	}
}
