package main

import (
	"fmt"
	"os"
	"path"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// No Docker on the test machines: these tests read docker-compose.yml
// statically (yaml.v3 resolves its `<<:` merge keys as compose does).

// composeService is the part of a compose service the checks read.
type composeService struct {
	Image       string            `yaml:"image"`
	Build       any               `yaml:"build"`
	PullPolicy  string            `yaml:"pull_policy"`
	Command     any               `yaml:"command"` // a list or a string
	Ports       []any             `yaml:"ports"`   // "host:port:port" or {host_ip, published, target}
	Volumes     []any             `yaml:"volumes"` // "src:dst[:mode]" or {source, target}
	Environment map[string]string `yaml:"environment"`
	Healthcheck *struct {
		Test    any  `yaml:"test"`
		Disable bool `yaml:"disable"`
	} `yaml:"healthcheck"`
}

func words(v any) []string {
	switch v := v.(type) {
	case string:
		return strings.Fields(v)
	case []any:
		var out []string
		for _, w := range v {
			out = append(out, fmt.Sprint(w))
		}
		return out
	}
	return nil
}

// portHost is the host address a published port binds ("" = every interface).
func portHost(p any) string {
	switch p := p.(type) {
	case map[string]any:
		if h, ok := p["host_ip"].(string); ok {
			return h
		}
		return ""
	default:
		s := fmt.Sprint(p)
		if strings.HasPrefix(s, "[") { // [::1]:8080:8080
			if i := strings.Index(s, "]"); i > 0 {
				return s[1:i]
			}
		}
		if parts := strings.Split(s, ":"); len(parts) == 3 {
			return parts[0]
		}
		return "" // "8080:8080" or "8080": every interface
	}
}

// volumeSource is the host side of a mount, and its target.
func volumeSource(v any) (src, dst string) {
	switch v := v.(type) {
	case map[string]any:
		src, _ = v["source"].(string)
		dst, _ = v["target"].(string)
		return src, dst
	default:
		s := fmt.Sprint(v)
		// ${VAR:?message with: colons}:/dst:ro — skip the interpolation.
		if strings.HasPrefix(s, "${") {
			if i := strings.Index(s, "}"); i > 0 {
				rest := strings.Split(strings.TrimPrefix(s[i+1:], ":"), ":")
				return s[:i+1], rest[0]
			}
		}
		parts := strings.Split(s, ":")
		if len(parts) == 1 {
			return "", parts[0]
		}
		return parts[0], parts[1]
	}
}

var (
	pinnedTag = regexp.MustCompile(`^v?\d+\.\d+\.\d+([-.+_][0-9A-Za-z.-]+)?$`)
	majorOnly = regexp.MustCompile(`^v?\d+([-.][A-Za-z][0-9A-Za-z.-]*)?$`)
)

// imageProblem says what is wrong with an image reference, or "".
func imageProblem(image string, built bool) string {
	if image == "" {
		return "no image"
	}
	if strings.Contains(image, "@sha256:") {
		return "" // pinned by digest
	}
	tag := ""
	if i := strings.LastIndex(image, ":"); i > strings.LastIndex(image, "/") {
		tag = image[i+1:]
	}
	switch {
	case tag == "":
		return "no tag (means :latest)"
	case tag == "latest":
		return ":latest"
	case majorOnly.MatchString(tag):
		return "only a major version (" + tag + ")"
	case built:
		return "" // a local build's name, checked for pull_policy elsewhere
	case !pinnedTag.MatchString(tag):
		return "not a pinned major.minor.patch version (" + tag + ")"
	}
	return ""
}

// composeProblems lists what is unsafe in a compose file.
func composeProblems(data []byte) ([]string, error) {
	var doc struct {
		Services map[string]composeService `yaml:"services"`
	}
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, err
	}
	var probs []string
	bad := func(name, format string, args ...any) {
		probs = append(probs, name+": "+fmt.Sprintf(format, args...))
	}
	if len(doc.Services) == 0 {
		return []string{"no services"}, nil
	}
	names := make([]string, 0, len(doc.Services))
	for n := range doc.Services {
		names = append(names, n)
	}
	sort.Strings(names)
	var sawAPI, sawWorker, sawRedis bool
	for _, name := range names {
		s := doc.Services[name]
		cmd := words(s.Command)
		role := ""
		if s.Build != nil || strings.HasPrefix(s.Image, "sluice") {
			if len(cmd) > 0 {
				role = cmd[0]
			} else {
				role = "serve" // the image's default command
			}
		}
		isRedis := strings.HasPrefix(path.Base(s.Image), "redis:") || path.Base(s.Image) == "redis"
		isMonitor := strings.Contains(s.Image, "asynqmon") || name == "asynqmon"

		// Images: pinned; a local build is built, never pulled.
		if p := imageProblem(s.Image, s.Build != nil); p != "" {
			bad(name, "image %q: %s", s.Image, p)
		}
		if s.Build != nil && s.PullPolicy != "build" {
			bad(name, "built locally but pull_policy is %q, not build: compose may pull someone else's %q", s.PullPolicy, s.Image)
		}

		// Published ports: only the api (which authenticates every route)
		// may listen beyond this machine; Redis and asynqmon not at all.
		for _, p := range s.Ports {
			host := portHost(p)
			switch {
			case isRedis || isMonitor:
				bad(name, "publishes port %v: it has no authentication, keep it on the compose network", p)
			case role == "api" || role == "serve":
			case host != "127.0.0.1":
				bad(name, "publishes port %v on %q, not 127.0.0.1", p, host)
			}
		}

		// Long-running sluice servers have a health check on /readyz.
		if role == "api" || role == "serve" || role == "worker" {
			if role == "worker" {
				sawWorker = true
			} else {
				sawAPI = true
			}
			test := ""
			if s.Healthcheck != nil && !s.Healthcheck.Disable {
				test = strings.Join(words(s.Healthcheck.Test), " ")
			}
			switch {
			case test == "" || test == "NONE":
				bad(name, "no healthcheck")
			case !strings.Contains(test, "/readyz"):
				bad(name, "healthcheck %q does not ask /readyz", test)
			case strings.Contains(test, "curl") || strings.Contains(test, "wget"):
				bad(name, "healthcheck %q uses a tool the distroless image lacks", test)
			}
			// Its configuration is mounted (the image holds the example
			// file at the default path) and is not the example file.
			cfgPath := s.Environment["SLUICE_CONFIG"]
			if i := slices.Index(cmd, "--config"); i >= 0 && i+1 < len(cmd) {
				cfgPath = cmd[i+1]
			}
			mounted := false
			for _, v := range s.Volumes {
				if _, dst := volumeSource(v); dst == cfgPath {
					mounted = true
				}
			}
			if cfgPath == "" || !mounted {
				bad(name, "its config (%q) is not mounted: the image's built-in file is sluice.example.yaml, with published keys", cfgPath)
			}
		}
		for _, v := range s.Volumes {
			src, _ := volumeSource(v)
			// ${VAR:?message}: the message is not a path; a default
			// (${VAR:-path}) is.
			if i := strings.Index(src, "?"); strings.HasPrefix(src, "${") && i > 0 {
				src = src[:i]
			}
			if strings.Contains(src, "sluice.example.yaml") {
				bad(name, "mounts %s: its keys are published in the repository", src)
			}
		}

		// Redis keeps what it accepted, and never evicts.
		if isRedis {
			sawRedis = true
			c := strings.Join(words(s.Command), " ")
			if !strings.Contains(c, "--appendonly yes") {
				bad(name, "Redis without --appendonly yes: a restart loses accepted jobs")
			}
			if !strings.Contains(c, "--maxmemory-policy noeviction") {
				bad(name, "Redis without --maxmemory-policy noeviction: sluice refuses an evicting Redis")
			}
		}
	}
	if !sawAPI || !sawWorker || !sawRedis {
		probs = append(probs, fmt.Sprintf("missing a service: api %t, worker %t, redis %t", sawAPI, sawWorker, sawRedis))
	}
	return probs, nil
}

func TestComposeFile(t *testing.T) {
	data, err := os.ReadFile("../../docker-compose.yml")
	if err != nil {
		t.Fatal(err)
	}
	probs, err := composeProblems(data)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range probs {
		t.Error(p)
	}
	// The operator must name a config file: compose fails without one.
	if !strings.Contains(string(data), "${SLUICE_CONFIG_FILE:?") {
		t.Error("the config mount does not require SLUICE_CONFIG_FILE")
	}
}

// TestComposeChecksCatch feeds the checks an unsafe file (the compose file
// as it was before) and makes sure each problem is reported.
func TestComposeChecksCatch(t *testing.T) {
	unsafe := `
x-sluice: &sluice
  build: .
  image: sluice:latest
  volumes:
    - ./sluice.example.yaml:/etc/sluice/sluice.yaml:ro
  environment:
    SLUICE_CONFIG: /etc/sluice/sluice.yaml
services:
  redis:
    image: redis:7
    command: ["redis-server", "--appendonly", "no"]
    ports: ["6379:6379"]
  api:
    <<: *sluice
    command: ["api", "--listen", ":8080"]
    ports: ["8080:8080"]
  worker:
    <<: *sluice
    command: ["worker", "--listen", ":8081"]
    healthcheck:
      test: ["CMD", "curl", "-f", "http://127.0.0.1:8081/healthz"]
  asynqmon:
    image: hibiken/asynqmon:latest
    ports: ["127.0.0.1:8082:8080"]
  other:
    image: busybox
    ports: ["0.0.0.0:9000:9000"]
    volumes: ["${CFG:-./sluice.example.yaml}:/etc/sluice/sluice.yaml"]
  pinned-minor:
    image: nginx:1.27
  mounted-long:
    image: nginx:1.27.3-bookworm
    volumes:
      - type: bind
        source: ./sluice.example.yaml
        target: /x.yaml
`
	probs, err := composeProblems([]byte(unsafe))
	if err != nil {
		t.Fatal(err)
	}
	all := strings.Join(probs, "\n")
	for _, want := range []string{
		`api: image "sluice:latest": :latest`,
		`api: built locally but pull_policy`,
		`api: no healthcheck`,
		`api: mounts ./sluice.example.yaml`,
		`worker: healthcheck "CMD curl -f http://127.0.0.1:8081/healthz" does not ask /readyz`,
		`redis: image "redis:7": only a major version`,
		`redis: publishes port 6379:6379`,
		`redis: Redis without --appendonly yes`,
		`redis: Redis without --maxmemory-policy noeviction`,
		`asynqmon: image "hibiken/asynqmon:latest": :latest`,
		`asynqmon: publishes port 127.0.0.1:8082:8080`,
		`other: image "busybox": no tag`,
		`other: publishes port 0.0.0.0:9000:9000 on "0.0.0.0"`,
		`other: mounts ${CFG:-./sluice.example.yaml}`,
		`pinned-minor: image "nginx:1.27": not a pinned major.minor.patch version`,
		`mounted-long: mounts ./sluice.example.yaml`,
	} {
		if !strings.Contains(all, want) {
			t.Errorf("not reported: %s", want)
		}
	}
	if strings.Contains(all, "api: publishes") {
		t.Error("the api may publish its port: it authenticates every route")
	}
	if t.Failed() {
		t.Logf("reported:\n%s", all)
	}

	// An api without its config mounted would run the image's example file.
	probs, _ = composeProblems([]byte(`
services:
  redis: {image: "redis:7.4.6", command: "redis-server --appendonly yes --maxmemory-policy noeviction"}
  api: {image: "sluice:1.2.3", command: ["api"], healthcheck: {test: ["CMD", "/usr/local/bin/sluice", "healthcheck", "--url", "http://127.0.0.1:8080/readyz"]}}
  worker: {image: "sluice:1.2.3", command: ["worker"], healthcheck: {test: "x /readyz"}, environment: {SLUICE_CONFIG: /c.yaml}, volumes: ["./mine.yaml:/c.yaml:ro"]}
`))
	if got := strings.Join(probs, "\n"); !strings.Contains(got, "api: its config") || strings.Contains(got, "worker:") || strings.Contains(got, "redis:") {
		t.Errorf("config mount check: got\n%s", got)
	}
}
