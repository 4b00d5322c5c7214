package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/internal/rkeys"
)

// BenchmarkClusterAdmission drives POST /v1/jobs through one and through
// two `sluice api` processes (64 clients in all) for two model groups,
// against one Redis and against a Redis Cluster of three primaries where
// the two groups' engines live on different primaries. It reports
// admissions per second
// and, per Redis primary, its share of the admissions, the scripts' time
// per admission it ran (wall time inside Redis: on a machine where every
// process shares the cores, it includes waiting for one) and how many
// admissions went in one script call. One group's admissions all run on
// one primary: 1 s divided by that time is the group's ceiling, however
// many shards there are.
//
//	go test -run '^$' -bench ClusterAdmission -benchtime 20000x ./cmd/sluice/
func BenchmarkClusterAdmission(b *testing.B) {
	for _, mode := range []string{"single", "cluster"} {
		for _, apis := range []int{1, 2} {
			b.Run(fmt.Sprintf("%s/apis=%d", mode, apis), func(b *testing.B) { benchClusterAdmission(b, mode, apis) })
		}
	}
}

func benchClusterAdmission(b *testing.B, mode string, napi int) {
	var url string
	var nodes []*redistest.Server
	g2 := "haiku"
	if mode == "cluster" {
		rc := redistest.StartCluster(b, redistest.ClusterOptions{Masters: 3})
		url, nodes, g2 = rc.URL, rc.Masters, groupBeside(b, rc, "sonnet")
	} else {
		r := redistest.Start(b)
		url, nodes = r.URL, []*redistest.Server{r}
	}
	cfg := fmt.Sprintf(`admin_keys: [%q]
tenants:
  - name: acme
    keys: [%q]
    max_queued: 0
    max_wait: 0s
model_groups:
  - name: sonnet
    models: ["claude-sonnet-*"]
    rpm: 1000
    input_tpm: 1000000
    output_tpm: 1000000
  - name: %s
    models: ["claude-haiku-*"]
    rpm: 1000
    input_tpm: 1000000
    output_tpm: 1000000
redis:
  mode: %s
`, harness.AdminKey, harness.TenantKey, g2, mode)
	path := filepath.Join(b.TempDir(), "sluice.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		b.Fatal(err)
	}
	env := []string{"REDIS_URL=" + url, "ANTHROPIC_BASE_URL=http://127.0.0.1:1", "SLUICE_LOG_LEVEL=info"}
	var apis []string
	for i := 0; i < napi; i++ {
		p := startProc(b, "api", path, env)
		apis = append(apis, p.baseURL(b))
	}
	ctx := context.Background()
	for _, n := range nodes {
		if err := n.Client(b).ConfigResetStat(ctx).Err(); err != nil {
			b.Fatal(err)
		}
	}
	const clients = 64
	tr := &http.Transport{MaxIdleConnsPerHost: clients, MaxConnsPerHost: clients}
	hc := &http.Client{Transport: tr}
	defer tr.CloseIdleConnections()
	var next atomic.Int64
	var wg sync.WaitGroup
	b.ResetTimer()
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1)
				if i > int64(b.N) {
					return
				}
				model := []string{"claude-sonnet-4-6", "claude-haiku-4-5"}[i%2]
				body := fmt.Sprintf(`{"user_id":"user-%d","request":{"model":%q,"max_tokens":20,"messages":[{"role":"user","content":"Hello, how do token buckets work?"}]}}`, i%1000, model)
				req, _ := http.NewRequest(http.MethodPost, apis[c%len(apis)]+"/v1/jobs", bytes.NewReader([]byte(body)))
				req.Header.Set("x-api-key", harness.TenantKey)
				resp, err := hc.Do(req)
				if err != nil {
					b.Error(err)
					return
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusAccepted {
					b.Errorf("status %d", resp.StatusCode)
					return
				}
			}
		}()
	}
	wg.Wait()
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "req/s")
	for i, n := range nodes {
		usec, calls := redistest.ScriptTime(b, n.Client(b))
		// The admissions this primary ran: its groups' sequences (an api
		// sends a group's admissions that arrive together in one call).
		admitted := 0
		for _, g := range []string{"sonnet", g2} {
			if k, err := n.Client(b).Get(ctx, rkeys.FQ(g, "seq")).Int(); err == nil {
				admitted += k
			}
		}
		if calls > 0 && admitted > 0 {
			b.ReportMetric(float64(admitted)/float64(b.N), fmt.Sprintf("node%d-share", i))
			b.ReportMetric(usec/float64(admitted), fmt.Sprintf("node%d-µs/admission", i))
			b.ReportMetric(float64(admitted)/float64(calls), fmt.Sprintf("node%d-admissions/script", i))
		}
	}
}
