package chaos

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/proctest"
	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/internal/rkeys"
)

// Keys of the chaos cluster.
const (
	tenantKey   = "sk-chaos-tenant-0123456789"
	adminKey    = "sk-chaos-admin-0123456789"
	upstreamKey = "sk-ant-chaos-upstream-0000"
	model       = "claude-sonnet-4-6"
)

// clusterOpts tune one scenario's sluice.
type clusterOpts struct {
	// WorkerShutdown is worker.shutdown_timeout (default 5s).
	WorkerShutdown time.Duration
	// TokensPerSecond is the fake's output pace (default 20).
	TokensPerSecond float64
	// Sentinel runs Redis as a primary, a replica and three sentinels
	// (redis.mode sentinel; redis is then the primary); RedisConfig is
	// appended to the redis section of the configuration.
	Sentinel    bool
	RedisConfig string
	// RedisCluster runs Redis as a cluster of three primaries with one
	// replica each (redis.mode cluster; redis is then the primary that
	// serves the model group's slot).
	RedisCluster bool
	// RedisArgs are extra redis-server arguments of a single Redis.
	RedisArgs []string
}

// cluster is one scenario's processes: a redis-server with AOF, the fake
// upstream, one api and two workers, on free loopback ports. Every process
// logs to its own file under the scenario's artifacts folder.
type cluster struct {
	t       *testing.T
	dir     string // artifacts: logs and the upstream's journal
	redis   *redistest.Server
	sent    *redistest.Sentinels // with clusterOpts.Sentinel
	rc      *redistest.Cluster   // with clusterOpts.RedisCluster
	cfgPath string
	env     []string
	spec    fakeSpec
	fake    *proctest.Proc
	fakeURL string
	workers []*proctest.Proc

	mu     sync.Mutex
	api    *proctest.Proc
	apiURL string
	starts map[string]int // per role, for log file names
}

// artifactsDir is $SLUICE_ARTIFACTS/chaos, or test-artifacts/chaos at the
// repository root.
func artifactsDir(t testing.TB) string {
	dir := os.Getenv("SLUICE_ARTIFACTS")
	if dir == "" {
		_, file, _, _ := runtime.Caller(0)
		dir = filepath.Join(filepath.Dir(file), "..", "test-artifacts")
	}
	dir = filepath.Join(dir, "chaos")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

func startCluster(t *testing.T, name string, o clusterOpts) *cluster {
	t.Helper()
	if o.WorkerShutdown == 0 {
		o.WorkerShutdown = 5 * time.Second
	}
	if o.TokensPerSecond == 0 {
		o.TokensPerSecond = 20
	}
	size := "short"
	if full() {
		size = "full"
	}
	dir := filepath.Join(artifactsDir(t), size, name)
	_ = os.RemoveAll(dir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	c := &cluster{t: t, dir: dir, starts: map[string]int{}}
	redisURL, redisMode := "", "single"
	switch {
	case o.Sentinel:
		c.sent = redistest.StartSentinel(t, redistest.SentinelOptions{})
		c.redis, redisURL, redisMode = c.sent.Primary, c.sent.URL, "sentinel"
	case o.RedisCluster:
		c.rc = redistest.StartCluster(t, redistest.ClusterOptions{Masters: 3, ReplicasPerMaster: 1, NodeTimeout: time.Second})
		c.redis, redisURL, redisMode = c.rc.MasterFor(t, rkeys.Limiter("sonnet")), c.rc.URL, "cluster"
	default:
		c.redis = redistest.StartArgs(t, o.RedisArgs...)
		redisURL = c.redis.URL
	}
	c.spec = fakeSpec{Listen: "127.0.0.1:0", Journal: filepath.Join(dir, "upstream-journal.txt"),
		APIKey: upstreamKey, TokensPerSecond: o.TokensPerSecond, Latency: 100 * time.Millisecond}
	c.startFake()
	c.spec.Listen = strings.TrimPrefix(c.fakeURL, "http://") // a restart comes back on the same port

	cfg := fmt.Sprintf(`admin_keys: [%q]
tenants:
  - name: chaos
    keys: [%q]
    max_queued: 0   # unlimited: the suite counts faults, not refusals
    max_wait: 0s
model_groups:
  - name: sonnet
    models: ["claude-sonnet-*"]
    rpm: 100000
    input_tpm: 100000000
    output_tpm: 100000000
    max_concurrency: 24
    probe_interval: 250ms
    probe_interval_max: 2s
upstream:
  backoff_base: 100ms
  backoff_max: 1s
api:
  shutdown_timeout: 5s
worker:
  shutdown_timeout: %s
  lease_ttl: %s
  task_check_interval: 20ms
redis:
  mode: %s
%s
`, adminKey, tenantKey, o.WorkerShutdown, *leaseTTL, redisMode, o.RedisConfig)
	c.cfgPath = filepath.Join(dir, "sluice.yaml")
	if err := os.WriteFile(c.cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	c.env = []string{"REDIS_URL=" + redisURL, "ANTHROPIC_BASE_URL=" + c.fakeURL,
		"ANTHROPIC_API_KEY=" + upstreamKey, "SLUICE_LOG_LEVEL=info"}
	api := c.startSluice("api")
	c.workers = []*proctest.Proc{c.startSluice("worker"), c.startSluice("worker")}
	c.setAPI(api, api.BaseURL(t))
	for _, w := range c.workers {
		w.BaseURL(t)
	}
	return c
}

// startSluice starts `sluice role`; it logs to <role>-<n>.log.
func (c *cluster) startSluice(role string) *proctest.Proc {
	c.t.Helper()
	c.mu.Lock()
	c.starts[role]++
	n := c.starts[role]
	c.mu.Unlock()
	name := fmt.Sprintf("%s-%d", role, n)
	return proctest.Start(c.t, proctest.SluiceBinary(c.t), []string{role, "--config", c.cfgPath, "--listen", "127.0.0.1:0"},
		proctest.Options{Name: name, Env: c.env, LogFile: filepath.Join(c.dir, name+".log"), Quiet: true})
}

// restartWorker starts a new worker process in place of workers[i].
func (c *cluster) restartWorker(i int) {
	c.t.Helper()
	w := c.startSluice("worker")
	w.BaseURL(c.t)
	c.workers[i] = w
}

// startFake starts the fake upstream's process (on spec.Listen).
func (c *cluster) startFake() {
	c.t.Helper()
	spec, _ := json.Marshal(c.spec)
	c.mu.Lock()
	c.starts["upstream"]++
	name := fmt.Sprintf("upstream-%d", c.starts["upstream"])
	c.mu.Unlock()
	exe, err := os.Executable()
	if err != nil {
		c.t.Fatal(err)
	}
	c.fake = proctest.Start(c.t, exe, nil, proctest.Options{Name: name, Env: []string{fakeEnv + "=" + string(spec)},
		LogFile: filepath.Join(c.dir, name+".log"), Quiet: true})
	c.fakeURL = c.fake.BaseURL(c.t)
}

func (c *cluster) setAPI(p *proctest.Proc, base string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.api, c.apiURL = p, base
}

// API is the base URL clients use now.
func (c *cluster) API() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.apiURL
}

func (c *cluster) apiProc() *proctest.Proc {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.api
}

// upstreamCounts reads the fake's journal: per prompt, the calls it
// received and the complete answers it sent, across restarts.
func (c *cluster) upstreamCounts() map[string]fakeanthropic.PromptCount {
	c.t.Helper()
	f, err := os.Open(c.spec.Journal)
	if err != nil {
		c.t.Fatal(err)
	}
	defer f.Close()
	counts, err := fakeanthropic.ReadJournal(f)
	if err != nil {
		c.t.Fatal(err)
	}
	return counts
}

// fakeInFlight is the fake's count of calls being answered now (-1 if it
// cannot be read).
func (c *cluster) fakeInFlight() int {
	var st struct {
		InFlight int `json:"in_flight"`
	}
	if getJSON(c.fakeURL+"/_fake/stats?log=0", &st) != nil {
		return -1
	}
	return st.InFlight
}

// workerInFlight is a worker's own count of upstream calls in flight (-1 if
// it cannot be read).
func (c *cluster) workerInFlight(w *proctest.Proc) int {
	base := w.BaseURL(c.t)
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, `sluice_upstream_in_flight{group="sonnet"} `); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			if err != nil {
				return -1
			}
			return int(f)
		}
	}
	return 0
}

// waitFor polls cond every 100 ms until it holds or within passes; it
// reports whether it held.
func waitFor(within time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(within)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(100 * time.Millisecond) // polling processes we do not control: no event to wait on
	}
}

func getJSON(u string, v any) error {
	resp, err := http.Get(u)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("GET %s: %d %s", u, resp.StatusCode, b)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}
