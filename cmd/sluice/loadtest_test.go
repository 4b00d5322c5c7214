package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"strings"
	"testing"
	"time"
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

func TestLoadtestFlags(t *testing.T) {
	noEnv := func(string) string { return "" }
	var stderr bytes.Buffer
	err := run(context.Background(), []string{"loadtest", "--help"}, noEnv, &bytes.Buffer{}, &stderr)
	if !errors.Is(err, flag.ErrHelp) {
		t.Errorf("loadtest --help: err = %v, want flag.ErrHelp", err)
	}
	for _, want := range []string{"--scenario", "classroom", "heavy-vs-light", "saturate", "--fake-url", "--json", "SLUICE_KEY"} {
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
