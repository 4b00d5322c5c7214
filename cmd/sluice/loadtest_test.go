package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/redistest"
)

// roomy are limits far above what the small scenarios below ask for, and an
// instant fake, so that they finish in seconds.
var roomy = []string{
	"--rpm", "100000", "--input-tpm", "100000000", "--output-tpm", "100000000", "--max-concurrency", "8",
	"--tokens-per-second", "0", "--latency", "0", "--reply-tokens", "5", "--prompt-bytes", "200",
	"--timeout", "60s", "--json",
}

// runLoadtestJSON runs `sluice loadtest` in-process and decodes its report.
func runLoadtestJSON(t *testing.T, args ...string) map[string]any {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	noEnv := func(string) string { return "" } // no REDIS_URL: it starts its own
	if err := run(ctx, append([]string{"loadtest"}, append(args, roomy...)...), noEnv, &stdout, &stderr); err != nil {
		t.Fatalf("loadtest: %v\nstderr:\n%s", err, stderr.String())
	}
	var rep map[string]any
	if err := json.Unmarshal(stdout.Bytes(), &rep); err != nil {
		t.Fatalf("the report is not one JSON object: %v\n%s", err, stdout.String())
	}
	return rep
}

// requireKeys fails unless every dotted path exists in rep (its value may
// be null).
func requireKeys(t *testing.T, rep map[string]any, paths ...string) {
	t.Helper()
	for _, p := range paths {
		var cur any = rep
		for _, k := range strings.Split(p, ".") {
			m, ok := cur.(map[string]any)
			if !ok {
				t.Errorf("report: %s: %v is not an object", p, cur)
				break
			}
			if cur, ok = m[k]; !ok {
				t.Errorf("report: %s is missing", p)
				break
			}
		}
	}
}

func TestLoadtestClassroomInProcess(t *testing.T) {
	rep := runLoadtestJSON(t, "--scenario", "classroom", "--users", "5", "--requests-per-user", "2", "--spread", "500ms")
	requireKeys(t, rep,
		"scenario", "duration_seconds", "jobs_submitted", "refused", "limits", "notes", "jobs_lost",
		"utilization.rpm", "utilization.input_tpm", "utilization.output_tpm", "utilization.binding",
		"upstream_429", "jain_index", "newcomer_max_dispatches_before",
		"wait_seconds.student.p50", "wait_seconds.student.p95", "wait_seconds.student.max",
		"position_accuracy.mean_abs_error", "position_accuracy.exact_fraction")
	if t.Failed() {
		t.FailNow()
	}
	if rep["scenario"] != "classroom" {
		t.Errorf("scenario = %v", rep["scenario"])
	}
	for key, want := range map[string]float64{"jobs_submitted": 10, "jobs_accepted": 10, "jobs_lost": 0, "upstream_429": 0} {
		if got, _ := rep[key].(float64); got != want {
			t.Errorf("%s = %v, want %v", key, rep[key], want)
		}
	}
	if got := rep["final_status"].(map[string]any)["succeeded"]; got != 10.0 {
		t.Errorf("final_status = %v, want 10 succeeded", rep["final_status"])
	}
	u := rep["utilization"].(map[string]any)
	if u["source"] != "fake" {
		t.Errorf("utilization.source = %v, want fake (in-process knows its fake)", u["source"])
	}
	for _, dim := range []string{"rpm", "input_tpm", "output_tpm"} {
		if f, ok := u[dim].(float64); !ok || f < 0 {
			t.Errorf("utilization.%s = %v, want a fraction", dim, u[dim])
		}
	}
	if n := rep["wait_seconds"].(map[string]any)["student"].(map[string]any)["n"]; n != 10.0 {
		t.Errorf("wait_seconds.student.n = %v, want 10", n)
	}
}

func TestLoadtestHeavyVsLightInProcess(t *testing.T) {
	rep := runLoadtestJSON(t, "--scenario", "heavy-vs-light", "--heavy-jobs", "12", "--users", "2")
	if got := rep["jobs_lost"]; got != 0.0 {
		t.Errorf("jobs_lost = %v, want 0", got)
	}
	if _, ok := rep["newcomer_max_dispatches_before"].(float64); !ok {
		t.Errorf("newcomer_max_dispatches_before = %v, want a number", rep["newcomer_max_dispatches_before"])
	}
	if got := rep["jain_index"]; got != nil {
		t.Errorf("jain_index = %v, want null for heavy-vs-light", got)
	}
	w := rep["wait_seconds"].(map[string]any)
	if _, ok := w["light"]; !ok {
		t.Errorf("wait_seconds has no light class: %v", w)
	}
	if n := len(rep["newcomers"].([]any)); n != 2 {
		t.Errorf("%d newcomers, want 2", n)
	}
}

// classes: the background backlog is queued in the background class and
// every interactive newcomer goes ahead of it: few dispatches before each.
func TestLoadtestClassesInProcess(t *testing.T) {
	rep := runLoadtestJSON(t, "--scenario", "classes", "--heavy-jobs", "16", "--background-users", "2", "--users", "3")
	if got := rep["jobs_lost"]; got != 0.0 {
		t.Errorf("jobs_lost = %v, want 0", got)
	}
	if got, ok := rep["newcomer_max_dispatches_before"].(float64); !ok || got > 2 {
		t.Errorf("newcomer_max_dispatches_before = %v, want at most 2", rep["newcomer_max_dispatches_before"])
	}
	if share, ok := rep["background_share"].(float64); !ok || share < 0 || share > 1 {
		t.Errorf("background_share = %v, want a fraction", rep["background_share"])
	}
	w := rep["wait_seconds"].(map[string]any)
	for _, class := range []string{"interactive", "background"} {
		if _, ok := w[class]; !ok {
			t.Errorf("wait_seconds has no %s class: %v", class, w)
		}
	}
	if n := len(rep["newcomers"].([]any)); n != 3 {
		t.Errorf("%d newcomers, want 3", n)
	}
}

// batch: the same jobs go once as interactive jobs and once as background
// jobs that can wait; the second pass goes by Message Batches only and
// costs half.
func TestLoadtestBatchInProcess(t *testing.T) {
	rep := runLoadtestJSON(t, "--scenario", "batch", "--users", "3", "--requests-per-user", "4", "--batch-delay", "300ms")
	requireKeys(t, rep, "batch_offload.cost_ratio",
		"batch_offload.interactive.succeeded", "batch_offload.interactive.dispatched_via", "batch_offload.interactive.cost_usd",
		"batch_offload.interactive.messages_calls", "batch_offload.interactive.wall_seconds",
		"batch_offload.batch.succeeded", "batch_offload.batch.dispatched_via", "batch_offload.batch.cost_usd",
		"batch_offload.batch.messages_calls", "batch_offload.batch.upstream_batches",
		"batch_offload.batch.upstream_batch_requests", "batch_offload.batch.wall_seconds")
	if t.Failed() {
		t.FailNow()
	}
	if got := rep["jobs_lost"]; got != 0.0 {
		t.Errorf("jobs_lost = %v, want 0", got)
	}
	if got := rep["final_status"].(map[string]any)["succeeded"]; got != 24.0 {
		t.Errorf("final_status = %v, want 24 succeeded (12 jobs, twice)", rep["final_status"])
	}
	bo := rep["batch_offload"].(map[string]any)
	in, bt := bo["interactive"].(map[string]any), bo["batch"].(map[string]any)
	for name, p := range map[string]map[string]any{"interactive": in, "batch": bt} {
		if p["jobs"] != 12.0 || p["succeeded"] != 12.0 {
			t.Errorf("%s pass: %v of %v jobs succeeded, want 12 of 12", name, p["succeeded"], p["jobs"])
		}
		if c, _ := p["cost_usd"].(float64); c <= 0 {
			t.Errorf("%s pass: cost_usd = %v, want > 0", name, p["cost_usd"])
		}
	}
	if via := in["dispatched_via"].(map[string]any); via["messages"] != 12.0 || len(via) != 1 {
		t.Errorf("interactive pass dispatched via %v, want messages 12", via)
	}
	if via := bt["dispatched_via"].(map[string]any); via["batch"] != 12.0 || len(via) != 1 {
		t.Errorf("batch pass dispatched via %v, want batch 12", via)
	}
	if in["messages_calls"] != 12.0 || in["upstream_batches"] != 0.0 {
		t.Errorf("interactive pass: %v Messages calls and %v batches upstream, want 12 and 0", in["messages_calls"], in["upstream_batches"])
	}
	if bt["messages_calls"] != 0.0 || bt["upstream_batch_requests"] != 12.0 {
		t.Errorf("batch pass: %v Messages calls and %v batch requests upstream, want 0 and 12", bt["messages_calls"], bt["upstream_batch_requests"])
	}
	if n, _ := bt["upstream_batches"].(float64); n < 1 || n != bt["batch_ids"] {
		t.Errorf("batch pass: %v batches upstream, the jobs name %v; want the same, at least 1", bt["upstream_batches"], bt["batch_ids"])
	}
	if ratio, ok := bo["cost_ratio"].(float64); !ok || ratio < 0.45 || ratio > 0.55 {
		t.Errorf("cost_ratio = %v, want 0.45–0.55 (the batch discount)", bo["cost_ratio"])
	}
}

func TestLoadtestFlags(t *testing.T) {
	noEnv := func(string) string { return "" }
	var stderr bytes.Buffer
	err := run(context.Background(), []string{"loadtest", "--help"}, noEnv, &bytes.Buffer{}, &stderr)
	if !errors.Is(err, flag.ErrHelp) {
		t.Errorf("loadtest --help: err = %v, want flag.ErrHelp", err)
	}
	for _, want := range []string{"--scenario", "classroom", "heavy-vs-light", "saturate", "batch", "--batch-delay", "--fake-url", "--json", "SLUICE_KEY"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("loadtest --help does not mention %s", want)
		}
	}
	for _, args := range [][]string{
		{"loadtest"}, // no scenario
		{"loadtest", "--scenario", "nope", "--url", "http://127.0.0.1:1", "--key", "k"},
		{"loadtest", "--scenario", "classroom", "--url", "http://127.0.0.1:1"}, // no key
	} {
		if err := run(context.Background(), args, noEnv, &bytes.Buffer{}, &bytes.Buffer{}); err == nil {
			t.Errorf("%q: want an error", args)
		}
	}
}

// Against a running sluice the tenant's own caps apply: the report names
// the cap that refused, not only the status.
func TestLoadtestAgainstURLNamesTheCapThatRefused(t *testing.T) {
	r := redistest.Start(t)
	fake, err := fakeanthropic.New(fakeanthropic.Config{
		Groups:  []fakeanthropic.Group{{Name: "sonnet", Models: []string{"claude-sonnet-*"}, RPM: 1000, InputTPM: 1000000, OutputTPM: 1000000}},
		APIKeys: []string{harness.UpstreamKey},
		Latency: 500 * time.Millisecond, // the heavy user's backlog stays queued while it submits
	})
	if err != nil {
		t.Fatal(err)
	}
	fsrv := httptest.NewServer(fake)
	t.Cleanup(fsrv.Close)
	cfg := strings.Replace(harness.BaseConfig(r.URL, fsrv.URL), "  - name: acme\n", "  - name: acme\n    max_queued: 3\n", 1)
	path := filepath.Join(t.TempDir(), "sluice.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{"ANTHROPIC_API_KEY": harness.UpstreamKey}
	base, _, _ := startRun(t, []string{"serve", "--config", path, "--listen", "127.0.0.1:0"}, func(k string) string { return env[k] })

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	args := []string{"loadtest", "--scenario", "heavy-vs-light", "--url", base, "--key", harness.TenantKey,
		"--heavy-jobs", "20", "--users", "1", "--reply-tokens", "5", "--prompt-bytes", "200", "--timeout", "60s", "--json"}
	if err := run(ctx, args, func(string) string { return "" }, &stdout, &stderr); err != nil {
		t.Fatalf("loadtest: %v\nstderr:\n%s", err, stderr.String())
	}
	var rep struct {
		Refused map[string]int `json:"refused"`
	}
	if err := json.Unmarshal(stdout.Bytes(), &rep); err != nil {
		t.Fatalf("the report is not JSON: %v\n%s", err, stdout.String())
	}
	// 8 running and 3 waiting at most while 20 arrive at once.
	if rep.Refused["429 queue_limit"] < 5 || len(rep.Refused) != 1 {
		t.Fatalf("refused %v; want the heavy user's surplus counted as 429 queue_limit", rep.Refused)
	}
}
