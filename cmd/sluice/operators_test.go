package main

import (
	"bufio"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/tasks"
)

// TestOperatorsViewEndToEnd runs `sluice serve` with JSON logs, answers two
// jobs, and checks what an operator sees: asynqmon shows the tasks by job
// id with no message content, /metrics counts the jobs and carries asynq's
// queue metrics, the dashboard opens with the admin key, and every log line
// about a job names the job, its tenant and its user, and never a prompt
// or a key.
func TestOperatorsViewEndToEnd(t *testing.T) {
	r := redistest.Start(t)
	_, fsrv := startFake(t)
	path := writeConfig(t, r.URL, fsrv.URL)
	env := map[string]string{"ANTHROPIC_API_KEY": harness.UpstreamKey, "SLUICE_LOG_FORMAT": "json"}
	base, stderr, stop := startRun(t, []string{"serve", "--config", path, "--listen", "127.0.0.1:0"}, func(k string) string { return env[k] })

	const secretPrompt = "my-private-homework-question"
	do := func(method, p, key, body string) (int, []byte) {
		t.Helper()
		req, _ := http.NewRequest(method, base+p, strings.NewReader(body))
		if key != "" {
			req.Header.Set("x-api-key", key)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, b
	}
	var ids []string
	for _, user := range []string{"alice", "bob"} {
		body := `{"user_id":"` + user + `","request":{"model":"claude-sonnet-4-6","max_tokens":50,"messages":[{"role":"user","content":"` + secretPrompt + ` [[reply_tokens=6]]"}]}}`
		st, b := do(http.MethodPost, "/v1/jobs", harness.TenantKey, body)
		if st != http.StatusAccepted {
			t.Fatalf("submit: %d %s", st, b)
		}
		var v jobs.View
		_ = json.Unmarshal(b, &v)
		ids = append(ids, v.ID)
	}
	for _, id := range ids {
		harness.Eventually(t, 20*time.Second, func() bool {
			_, b := do(http.MethodGet, "/v1/jobs/"+id, harness.TenantKey, "")
			var v jobs.View
			_ = json.Unmarshal(b, &v)
			return v.Status == jobs.Succeeded
		}, "job %s to succeed", id)
	}

	// asynqmon: the completed tasks, by job id, group and dispatch only.
	q := url.PathEscape(tasks.Queue("sonnet"))
	var listed struct {
		Tasks []struct {
			Payload string `json:"payload"`
			Result  string `json:"result"`
		} `json:"tasks"`
	}
	harness.Eventually(t, 10*time.Second, func() bool {
		st, b := do(http.MethodGet, "/monitoring/api/queues/"+q+"/completed_tasks", harness.AdminKey, "")
		if st != http.StatusOK {
			t.Fatalf("asynqmon completed tasks: %d %s", st, b)
		}
		_ = json.Unmarshal(b, &listed)
		return len(listed.Tasks) == 2
	}, "asynqmon to list both completed tasks")
	for _, task := range listed.Tasks {
		if !strings.HasPrefix(task.Payload, "job ") || !strings.Contains(task.Payload, "· group sonnet · dispatch 1") {
			t.Errorf("asynqmon shows the payload as %q", task.Payload)
		}
		if strings.Contains(task.Payload+task.Result, secretPrompt) {
			t.Errorf("asynqmon shows the message: %q %q", task.Payload, task.Result)
		}
	}
	if st, _ := do(http.MethodGet, "/monitoring/api/queues/"+q+"/completed_tasks", "", ""); st != http.StatusUnauthorized {
		t.Errorf("asynqmon's API without the admin key: %d", st)
	}
	if st, _ := do(http.MethodDelete, "/monitoring/api/queues/"+q+"/completed_tasks:delete_all", harness.AdminKey, ""); st < 400 {
		t.Errorf("asynqmon deleted tasks (%d): it must be read-only", st)
	}

	// /metrics: open to the scraper, sluice's counters and asynq's queues.
	st, page := do(http.MethodGet, "/metrics", "", "")
	if st != http.StatusOK {
		t.Fatalf("/metrics: %d", st)
	}
	for _, want := range []string{
		`sluice_admissions_total{group="sonnet",outcome="admitted"} 2`,
		`sluice_upstream_responses_total{group="sonnet",status="200"} 2`,
		`sluice_jobs_finished_total{group="sonnet",status="succeeded"} 2`,
		`sluice_queue_jobs{group="sonnet"} 0`,
		`asynq_tasks_processed_total{queue="group:sonnet"}`,
	} {
		if !strings.Contains(string(page), want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if strings.Contains(string(page), "alice") {
		t.Error("/metrics names a user")
	}
	if st, _ := do(http.MethodGet, "/dashboard", harness.AdminKey, ""); st != http.StatusOK {
		t.Errorf("/dashboard with the admin key: %d", st)
	}
	if st, _ := do(http.MethodGet, "/dashboard", "", ""); st != http.StatusUnauthorized {
		t.Errorf("/dashboard without a key: %d", st)
	}

	if err := stop(); err != nil {
		t.Fatal(err)
	}
	about := map[string]int{}
	sc := bufio.NewScanner(strings.NewReader(stderr.String()))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "{") {
			continue // the configuration dump at start-up
		}
		for _, secret := range []string{secretPrompt, harness.TenantKey, harness.UpstreamKey, harness.AdminKey} {
			if strings.Contains(line, secret) {
				t.Errorf("a log line holds a prompt or a key: %s", line)
			}
		}
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Errorf("a log line is not JSON: %s", line)
			continue
		}
		id, ok := rec["job_id"].(string)
		if !ok {
			continue
		}
		about[id]++
		if rec["tenant"] != "acme" || (rec["user_id"] != "alice" && rec["user_id"] != "bob") {
			t.Errorf("a log line about job %s lacks its tenant or user: %s", id, line)
		}
	}
	for _, id := range ids {
		if about[id] < 2 {
			t.Errorf("job %s: %d log lines, want at least queued and succeeded", id, about[id])
		}
	}
}
