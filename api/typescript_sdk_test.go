package api_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/sluice-dev/sluice/internal/harness"
)

// The official TypeScript SDK (@anthropic-ai/sdk, pinned in
// sdktest/typescript/package-lock.json) drives the same tool-use
// conversation through sluice and against the fake upstream directly:
// client.messages.stream() must see the same events and finish with the same
// message (the second one's stop_details and container included, which the
// SDK takes from message_delta). Its node_modules come from `npm ci --prefix sdktest/typescript`;
// without node or them the test is skipped, unless SLUICE_REQUIRE_NODE=1.

const tsSDKDir = "../sdktest/typescript"

// tsRun is what sdktest/typescript/stream-tools.mjs prints.
type tsRun struct {
	SDKVersion string `json:"sdk_version"`
	Turns      []struct {
		Events  []string       `json:"events"`
		Message map[string]any `json:"message"`
	} `json:"turns"`
}

// needNode returns node's path, or skips (fails with SLUICE_REQUIRE_NODE=1)
// when node or the SDK's installed modules are missing.
func needNode(t *testing.T) string {
	t.Helper()
	missing := func(format string, args ...any) {
		t.Helper()
		if os.Getenv("SLUICE_REQUIRE_NODE") == "1" {
			t.Fatalf(format+" (SLUICE_REQUIRE_NODE=1)", args...)
		}
		t.Skipf(format, args...)
	}
	node, err := exec.LookPath("node")
	if err != nil {
		missing("node is not on PATH: the TypeScript SDK test needs Node.js and `npm ci --prefix sdktest/typescript`")
	}
	if _, err := os.Stat(filepath.Join(tsSDKDir, "node_modules", "@anthropic-ai", "sdk", "package.json")); err != nil {
		missing("sdktest/typescript/node_modules has no @anthropic-ai/sdk: run `npm ci --prefix sdktest/typescript`")
	}
	return node
}

// runTS runs stream-tools.mjs against baseURL with key (and
// metadata.user_id = user, unless empty).
func runTS(t *testing.T, node, baseURL, key, user string) tsRun {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	args := []string{"stream-tools.mjs", baseURL, key, harness.Model}
	if user != "" {
		args = append(args, user)
	}
	cmd := exec.CommandContext(ctx, node, args...)
	cmd.Dir = tsSDKDir
	cmd.WaitDelay = 5 * time.Second
	// The SDK reads ANTHROPIC_* (keys, base URL, custom headers, profiles):
	// none of the caller's reach it.
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "ANTHROPIC_") && !strings.HasPrefix(kv, "SDKTEST_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("node stream-tools.mjs against %s: %v (ctx: %v)\nstderr:\n%s", baseURL, err, ctx.Err(), stderr.String())
	}
	var out tsRun
	if err := json.Unmarshal(stdout.Bytes(), &out); err != nil {
		t.Fatalf("stream-tools.mjs printed %q: %v\nstderr:\n%s", stdout.String(), err, stderr.String())
	}
	return out
}

// comparable is a final message without what legitimately differs between
// calls: the message id and the tool_use ids (as api/blocks_test.go leaves
// ids out), and usage.cache_creation. The SDK takes that breakdown only from
// message_start, which sluice sends itself before the upstream answers
// (docs/api.md); message_delta carries the totals, which are compared.
func comparable(m map[string]any) map[string]any {
	c := make(map[string]any, len(m))
	for k, v := range m {
		if k != "id" {
			c[k] = v
		}
	}
	if u, ok := m["usage"].(map[string]any); ok {
		nu := make(map[string]any, len(u))
		for k, v := range u {
			if k != "cache_creation" {
				nu[k] = v
			}
		}
		c["usage"] = nu
	}
	if content, ok := m["content"].([]any); ok {
		blocks := make([]any, len(content))
		for i, b := range content {
			bm, ok := b.(map[string]any)
			if !ok {
				blocks[i] = b
				continue
			}
			nb := make(map[string]any, len(bm))
			for k, v := range bm {
				if k != "id" {
					nb[k] = v
				}
			}
			blocks[i] = nb
		}
		c["content"] = blocks
	}
	return c
}

func TestTypeScriptSDKStreamWithTools(t *testing.T) {
	node := needNode(t)
	e := harness.Start(t, harness.Options{})
	direct := runTS(t, node, e.Upstream.URL, harness.UpstreamKey, "")
	sluice := runTS(t, node, e.API.URL, harness.TenantKey, "alice")
	t.Logf("@anthropic-ai/sdk %s", sluice.SDKVersion)

	if len(direct.Turns) != 2 {
		t.Fatalf("against the fake: %d turns, want the tool call and the answer to its result: %+v", len(direct.Turns), direct)
	}
	first := direct.Turns[0].Message
	content, _ := first["content"].([]any)
	if first["stop_reason"] != "tool_use" || len(content) != 2 || content[1].(map[string]any)["type"] != "tool_use" {
		t.Fatalf("the fake's first turn %v: want text then tool_use, stop tool_use", first)
	}
	if len(sluice.Turns) != len(direct.Turns) {
		t.Fatalf("through sluice: %d turns, want %d: %+v", len(sluice.Turns), len(direct.Turns), sluice)
	}
	for i := range direct.Turns {
		want, got := direct.Turns[i], sluice.Turns[i]
		if diff := cmp.Diff(want.Events, got.Events); diff != "" {
			t.Errorf("turn %d: stream events through sluice differ from the fake's (-fake +sluice):\n%s", i+1, diff)
		}
		if diff := cmp.Diff(comparable(want.Message), comparable(got.Message)); diff != "" {
			t.Errorf("turn %d: finalMessage() through sluice differs from the fake's (-fake +sluice):\n%s", i+1, diff)
		}
		if wu, _ := want.Message["usage"].(map[string]any); wu["input_tokens"] == nil || wu["output_tokens"] == nil {
			t.Errorf("turn %d: the fake's usage %v: want input and output tokens", i+1, wu)
		}
		if gu, _ := got.Message["usage"].(map[string]any); gu["cache_creation"] == nil {
			t.Logf("turn %d: usage.cache_creation is absent through sluice (not compared)", i+1)
		}
		if id, _ := got.Message["id"].(string); !strings.HasPrefix(id, "msg_") {
			t.Errorf("turn %d: message id %q through sluice: want msg_…", i+1, id)
		}
	}
	if last := sluice.Turns[1].Message; last["stop_reason"] != "end_turn" || last["container"] == nil {
		t.Errorf("second turn through sluice %v: want end_turn, and the container of its message_delta", last)
	}
}
