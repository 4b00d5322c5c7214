package cachekey

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf16"
	"unicode/utf8"
)

// quarter counts a fragment as a quarter of its bytes, as the brief's tests do.
func quarter(b json.RawMessage) int { return len(b) / 4 }

// declared counts a block as its "n" member says (0 without one), so that a
// test can put a prefix exactly at, under or over a minimum.
func declared(b json.RawMessage) int {
	var v struct {
		N int `json:"n"`
	}
	_ = json.Unmarshal(b, &v)
	return v.N
}

const sonnet = "claude-sonnet-4-5"

func mustParse(t *testing.T, model, body string, count func(json.RawMessage) int, opts ...Option) Prefixes {
	t.Helper()
	p, err := Parse(model, json.RawMessage(body), count, opts...)
	if err != nil {
		t.Fatalf("Parse(%s): %v", body, err)
	}
	return p
}

// at returns the hash of the prefix closed at the block with the given path.
func at(t *testing.T, p Prefixes, path string) Prefix {
	t.Helper()
	for _, x := range p {
		if x.Position.String() == path {
			return x
		}
	}
	t.Fatalf("no breakpoint at %s in %v", path, p)
	return Prefix{}
}

func TestPositions(t *testing.T) {
	tests := []struct {
		name string
		body string
		want []string // Position.String() of each breakpoint, in order
	}{
		{"none", `{"messages":[{"role":"user","content":"hi"}]}`, nil},
		{"empty body object", `{}`, nil},
		{"tools", `{"tools":[{"name":"a","input_schema":{}},{"name":"b","input_schema":{},"cache_control":{"type":"ephemeral"}}],
			"messages":[{"role":"user","content":"hi"}]}`, []string{"tools[1]"}},
		{"system blocks", `{"system":[{"type":"text","text":"you are","cache_control":{"type":"ephemeral"}},{"type":"text","text":"more"}],
			"messages":[{"role":"user","content":"hi"}]}`, []string{"system[0]"}},
		{"system string cannot carry one", `{"system":"you are helpful","messages":[{"role":"user","content":"hi"}]}`, nil},
		{"system string, breakpoint in messages", `{"system":"you are helpful","messages":[{"role":"user","content":[{"type":"text","text":"hi","cache_control":{"type":"ephemeral"}}]}]}`,
			[]string{"messages[0].content[0]"}},
		{"message content string cannot carry one", `{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"},{"role":"user","content":"again"}]}`, nil},
		{"message content blocks", `{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"},
			{"role":"user","content":[{"type":"text","text":"a"},{"type":"image","source":{"type":"base64","media_type":"image/png","data":"AAAA"},"cache_control":{"type":"ephemeral"}}]}]}`,
			[]string{"messages[2].content[1]"}},
		{"tool_result and tool_use blocks", `{"messages":[{"role":"user","content":"hi"},
			{"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"a","input":{"q":1},"cache_control":{"type":"ephemeral"}}]},
			{"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"ok","cache_control":{"type":"ephemeral","ttl":"5m"}}]}]}`,
			[]string{"messages[1].content[0]", "messages[2].content[0]"}},
		{"all sections, prefix order even when the JSON is not", `{
			"messages":[{"role":"user","content":[{"type":"text","text":"q","cache_control":{"type":"ephemeral"}}]}],
			"system":[{"type":"text","text":"s","cache_control":{"type":"ephemeral","ttl":"1h"}}],
			"tools":[{"name":"a","input_schema":{},"cache_control":{"type":"ephemeral","ttl":"1h"}}]}`,
			[]string{"tools[0]", "system[0]", "messages[0].content[0]"}},
		{"exactly four", `{"tools":[{"name":"a","cache_control":{"type":"ephemeral"}}],
			"system":[{"type":"text","text":"s","cache_control":{"type":"ephemeral"}}],
			"messages":[{"role":"user","content":[{"type":"text","text":"a","cache_control":{"type":"ephemeral"}},{"type":"text","text":"b","cache_control":{"type":"ephemeral"}}]}]}`,
			[]string{"tools[0]", "system[0]", "messages[0].content[0]", "messages[0].content[1]"}},
		{"null cache_control is none", `{"system":[{"type":"text","text":"s","cache_control":null}],"messages":[]}`, nil},
		{"null sections", `{"tools":null,"system":null,"messages":null,"tool_choice":null,"thinking":null}`, nil},
		{"nested cache_control is not a breakpoint", `{"tools":[{"name":"a","input_schema":{"type":"object","properties":{"cache_control":{"type":"ephemeral"}}}}],
			"messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"x","content":[{"type":"text","text":"r"}],"input":{"cache_control":{"type":"ephemeral"}}}]}]}`, nil},
		{"escaped key still counts", `{"system":[{"type":"text","text":"s","cache\u005fcontrol":{"type":"ephemeral"}}]}`, []string{"system[0]"}},
		{"duplicate sections: the last wins", `{"system":[{"type":"text","text":"s","cache_control":{"type":"ephemeral"}}],"system":"plain"}`, nil},
		{"duplicate content: the last wins", `{"messages":[{"role":"user","content":"x","content":[{"type":"text","text":"s","cache_control":{"type":"ephemeral"}}]}]}`,
			[]string{"messages[0].content[0]"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := mustParse(t, sonnet, tc.body, quarter)
			var got []string
			for _, x := range p {
				got = append(got, x.Position.String())
				if len(x.Hash) != 64 || strings.Trim(x.Hash, "0123456789abcdef") != "" {
					t.Errorf("%s: hash %q is not 64 hex digits", x.Position, x.Hash)
				}
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("breakpoints = %q, want %q", got, tc.want)
			}
			for k := 1; k < len(p); k++ {
				if p[k].Tokens < p[k-1].Tokens {
					t.Errorf("tokens decrease: %v", p)
				}
			}
		})
	}
}

func TestPositionFields(t *testing.T) {
	p := mustParse(t, sonnet, `{"tools":[{"name":"a"},{"name":"b","cache_control":{"type":"ephemeral"}}],
		"messages":[{"role":"user","content":"x"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b","cache_control":{"type":"ephemeral"}}]}]}`, quarter)
	want := []Position{{SectionTools, -1, 1}, {SectionMessages, 1, 1}}
	if len(p) != 2 || p[0].Position != want[0] || p[1].Position != want[1] {
		t.Fatalf("positions = %+v, want %+v", p, want)
	}
	if s := (Position{SectionSystem, -1, 3}).String(); s != "system[3]" {
		t.Errorf("String = %q", s)
	}
}

func TestTTL(t *testing.T) {
	tests := []struct {
		cc      string
		want    time.Duration
		wantErr string
	}{
		{`{"type":"ephemeral"}`, 5 * time.Minute, ""},
		{`{"type":"ephemeral","ttl":"5m"}`, 5 * time.Minute, ""},
		{`{"ttl":"1h","type":"ephemeral"}`, time.Hour, ""},
		{`{"type":"ephemeral","ttl":null}`, 5 * time.Minute, ""},
		{`{"type":"ephemeral","ttl":"\u0031h"}`, time.Hour, ""},
		{`{"type":"ephemeral","ttl":"10m"}`, 0, `system[0]: cache_control ttl must be "5m" or "1h", got "10m"`},
		{`{"type":"ephemeral","ttl":"1H"}`, 0, `ttl must be "5m" or "1h"`},
		{`{"type":"ephemeral","ttl":""}`, 0, `ttl must be "5m" or "1h"`},
		{`{"type":"ephemeral","ttl":300}`, 0, `ttl must be "5m" or "1h", got 300`},
		{`{"type":"persistent"}`, 0, `system[0]: cache_control type must be "ephemeral", got "persistent"`},
		{`{"ttl":"5m"}`, 0, `cache_control type must be "ephemeral", got none`},
		{`"ephemeral"`, 0, `system[0]: cache_control must be an object such as {"type": "ephemeral"}`},
	}
	for _, tc := range tests {
		t.Run(tc.cc, func(t *testing.T) {
			body := `{"system":[{"type":"text","text":"s","cache_control":` + tc.cc + `}]}`
			p, err := Parse(sonnet, json.RawMessage(body), quarter)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tc.wantErr)
				}
				if !errors.Is(err, ErrInvalidCacheControl) {
					t.Errorf("err %v does not wrap ErrInvalidCacheControl", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(p) != 1 || p[0].TTL != tc.want {
				t.Fatalf("got %+v, want TTL %v", p, tc.want)
			}
		})
	}
}

func TestMinimum(t *testing.T) {
	block := func(n int) string {
		return fmt.Sprintf(`{"type":"text","text":"x","n":%d,"cache_control":{"type":"ephemeral"}}`, n)
	}
	tests := []struct {
		name  string
		model string
		n     int
		opts  []Option
		want  bool
	}{
		{"sonnet under", "claude-sonnet-4-5", 1023, nil, false},
		{"sonnet exactly", "claude-sonnet-4-5", 1024, nil, true},
		{"opus exactly", "claude-opus-4-1", 1024, nil, true},
		{"opus under", "claude-opus-4-1", 1, nil, false},
		{"haiku under", "claude-haiku-4-5", 2047, nil, false},
		{"haiku at the sonnet minimum", "claude-3-5-haiku-latest", 1024, nil, false},
		{"haiku exactly", "claude-haiku-4-5", 2048, nil, true},
		{"haiku, any case", "Claude-HAIKU", 2047, nil, false},
		{"override lower", "claude-haiku-4-5", 600, []Option{WithMinTokens(600)}, true},
		{"override higher", "claude-sonnet-4-5", 4000, []Option{WithMinTokens(4096)}, false},
		{"override zero", "claude-sonnet-4-5", 0, []Option{WithMinTokens(0)}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := mustParse(t, tc.model, `{"system":[`+block(tc.n)+`]}`, declared, tc.opts...)
			if p[0].Tokens != tc.n || p[0].Cacheable != tc.want {
				t.Fatalf("got Tokens %d Cacheable %v, want %d %v", p[0].Tokens, p[0].Cacheable, tc.n, tc.want)
			}
		})
	}
	if MinTokens("claude-haiku-4-5") != 2048 || MinTokens("claude-opus-4-1") != 1024 || MinTokens("") != 1024 {
		t.Error("MinTokens")
	}

	// The minimum applies to the whole prefix: 600 in tools + 424 in system.
	p := mustParse(t, sonnet, `{"tools":[{"name":"a","n":600,"cache_control":{"type":"ephemeral"}}],
		"system":[{"type":"text","text":"s","n":424,"cache_control":{"type":"ephemeral"}}]}`, declared)
	if p[0].Tokens != 600 || p[0].Cacheable || p[1].Tokens != 1024 || !p[1].Cacheable {
		t.Fatalf("got %+v", p)
	}
}

func TestTooManyBreakpoints(t *testing.T) {
	cc := `"cache_control":{"type":"ephemeral"}`
	body := `{"tools":[{"name":"a",` + cc + `},{"name":"b",` + cc + `}],
		"system":[{"type":"text","text":"s",` + cc + `}],
		"messages":[{"role":"user","content":[{"type":"text","text":"a",` + cc + `},{"type":"text","text":"b",` + cc + `}]}]}`
	_, err := Parse(sonnet, json.RawMessage(body), quarter)
	if err == nil || err.Error() != "request has 5 cache_control breakpoints; the API accepts at most 4" {
		t.Fatalf("err = %v", err)
	}
	if !errors.Is(err, ErrTooManyBreakpoints) {
		t.Errorf("err does not wrap ErrTooManyBreakpoints")
	}
}

func TestInvalid(t *testing.T) {
	tests := []struct {
		body string
		kind error
		msg  string // a substring of the message
	}{
		{``, ErrInvalidJSON, "empty"},
		{`   `, ErrInvalidJSON, "empty"},
		{`{"messages":[`, ErrInvalidJSON, "unexpected end of input"},
		{`{"messages":[]} x`, ErrInvalidJSON, "unexpected 'x' at byte 16"},
		{`{"messages":[]}}`, ErrInvalidJSON, "after the top-level value"},
		{`{"a":01}`, ErrInvalidJSON, "unexpected '1'"},
		{`{"a":1.}`, ErrInvalidJSON, "after a decimal point"},
		{`{"a":1e}`, ErrInvalidJSON, "exponent"},
		{`{"a":-}`, ErrInvalidJSON, "number"},
		{`{"a":tru}`, ErrInvalidJSON, "literal"},
		{`{"a":"\x"}`, ErrInvalidJSON, "escape"},
		{`{"a":"\u12g4"}`, ErrInvalidJSON, `\u escape`},
		{"{\"a\":\"line\nbreak\"}", ErrInvalidJSON, "control characters"},
		{`{"a":[1,]}`, ErrInvalidJSON, "value should start"},
		{`{"a":1,}`, ErrInvalidJSON, "object key"},
		{`{a:1}`, ErrInvalidJSON, "object key"},
		{`{"a" 1}`, ErrInvalidJSON, "after an object key"},
		{`{"system":[{"type":"text","text":"unterminated}]}`, ErrInvalidJSON, "end of input"},
		{strings.Repeat("[", 10001) + strings.Repeat("]", 10001), ErrInvalidJSON, ""},
		{`{"x":` + strings.Repeat("[", 10001) + strings.Repeat("]", 10001) + `}`, ErrInvalidJSON, "nested too deeply"},
		{`{"messages":00`, ErrInvalidJSON, "unexpected '0'"},
		{`{"tools":{},"x":}`, ErrInvalidJSON, "value should start"},
		{`000`, ErrInvalidJSON, "after the top-level value"},
		{`[]`, ErrInvalidRequest, "must be a JSON object"},
		{`null`, ErrInvalidRequest, "must be a JSON object"},
		{`{"tools":{}}`, ErrInvalidRequest, "tools must be an array"},
		{`{"system":1}`, ErrInvalidRequest, "system must be a string or an array"},
		{`{"messages":"hi"}`, ErrInvalidRequest, "messages must be an array"},
		{`{"messages":["hi"]}`, ErrInvalidRequest, "messages[0] must be an object"},
		{`{"messages":[{"role":"user","content":"a"},{"role":"user","content":5}]}`, ErrInvalidRequest, "messages[1].content must be a string or an array"},
	}
	for _, tc := range tests {
		t.Run(truncate(tc.body, 40), func(t *testing.T) {
			_, err := Parse(sonnet, json.RawMessage(tc.body), quarter)
			if !errors.Is(err, tc.kind) || !strings.Contains(fmt.Sprint(err), tc.msg) {
				t.Fatalf("err = %v, want %v containing %q", err, tc.kind, tc.msg)
			}
			if tc.kind == ErrInvalidJSON && json.Valid([]byte(tc.body)) {
				t.Errorf("encoding/json accepts this body")
			}
		})
	}
}

// conversation builds a request; bp lists the block paths to mark.
const base = `{
  "model": "claude-sonnet-4-5", "max_tokens": 1024,
  "tools": [{"name": "get_weather", "description": "Weather for a city", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
  "system": [{"type": "text", "text": "You are a helpful assistant.\nBe brief.", "cache_control": {"type": "ephemeral"}}],
  "messages": [
    {"role": "user", "content": "What's the weather in Paris?"},
    {"role": "assistant", "content": [{"type": "tool_use", "id": "tu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "tu_1", "content": "18°C, cloudy", "cache_control": {"type": "ephemeral"}}]},
    {"role": "assistant", "content": "It is 18°C and cloudy in Paris."},
    {"role": "user", "content": "And in Lyon?"}
  ]
}`

const (
	sys = "system[0]"
	msg = "messages[2].content[0]"
)

// edit replaces old (which must occur) in s.
func edit(t *testing.T, s, old, new string) string {
	t.Helper()
	if !strings.Contains(s, old) {
		t.Fatalf("%q not in the body", old)
	}
	return strings.Replace(s, old, new, 1)
}

func TestSameHash(t *testing.T) {
	orig := mustParse(t, sonnet, base, quarter)
	tests := []struct {
		name  string
		body  func(t *testing.T) string
		paths []string // prefixes that keep their hash
	}{
		{"different later messages", func(t *testing.T) string {
			return edit(t, base, `"And in Lyon?"`, `"And in Marseille, tomorrow?"}, {"role": "assistant", "content": "Sunny."`)
		}, []string{sys, msg}},
		{"different key order and whitespace", func(t *testing.T) string {
			return `{"messages":[{"content":"What's the weather in Paris?","role":"user"},{"content":[{"input":{"city":"Paris"},"name":"get_weather","id":"tu_1","type":"tool_use"}],"role":"assistant"},
				{"content":[{"cache_control":{"type":"ephemeral"},"content":"18°C, cloudy","tool_use_id":"tu_1","type":"tool_result"}],"role":"user"}],
				"system":[{"cache_control":{"type":"ephemeral"},"text":"You are a helpful assistant.\nBe brief.","type":"text"}],
				"tools":[{"input_schema":{"properties":{"city":{"type":"string"}},"type":"object"},"description":"Weather for a city","name":"get_weather"}],
				"max_tokens":99,"model":"claude-sonnet-4-5"}`
		}, []string{sys, msg}},
		{"escapes that decode alike (as Python's ensure_ascii writes them)", func(t *testing.T) string {
			b := edit(t, base, `"18°C, cloudy"`, `"18\u00b0C, cloudy"`)
			return edit(t, b, `"You are a helpful assistant.\nBe brief."`, `"You are a helpful assistant.\u000a\u0042e brief."`)
		}, []string{sys, msg}},
		{"string content as a text block", func(t *testing.T) string {
			return edit(t, base, `"content": "What's the weather in Paris?"`, `"content": [{"type": "text", "text": "What's the weather in Paris?"}]`)
		}, []string{sys, msg}},
		{"other TTL", func(t *testing.T) string {
			return edit(t, base, `"cache_control": {"type": "ephemeral"}}],
  "messages"`, `"cache_control": {"type": "ephemeral", "ttl": "1h"}}],
  "messages"`)
		}, []string{sys, msg}},
		{"a breakpoint added before", func(t *testing.T) string {
			return edit(t, base, `"input": {"city": "Paris"}}`, `"input": {"city": "Paris"}, "cache_control": {"type": "ephemeral"}}`)
		}, []string{sys, msg}},
		{"other sampling settings", func(t *testing.T) string {
			return edit(t, base, `"max_tokens": 1024`, `"max_tokens": 50, "temperature": 0.2, "stream": true, "metadata": {"user_id": "u"}`)
		}, []string{sys, msg}},
		{"tool_choice and thinking keep tools and system prefixes", func(t *testing.T) string {
			return edit(t, base, `"max_tokens": 1024`, `"max_tokens": 1024, "tool_choice": {"type": "any"}, "thinking": {"type": "enabled", "budget_tokens": 2000}`)
		}, []string{sys}},
		{"explicit null tool_choice is absent", func(t *testing.T) string {
			return edit(t, base, `"max_tokens": 1024`, `"max_tokens": 1024, "tool_choice": null, "thinking": null`)
		}, []string{sys, msg}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := mustParse(t, sonnet, tc.body(t), quarter)
			for _, path := range tc.paths {
				if a, b := at(t, orig, path).Hash, at(t, got, path).Hash; a != b {
					t.Errorf("%s: hash changed: %s → %s", path, a, b)
				}
			}
		})
	}
}

func TestDifferentHash(t *testing.T) {
	orig := mustParse(t, sonnet, base, quarter)
	tests := []struct {
		name  string
		model string
		body  func(t *testing.T) string
		paths []string // prefixes whose hash must change
		same  []string // and those that must not
	}{
		{"one character in the system prompt", sonnet, func(t *testing.T) string {
			return edit(t, base, "Be brief.", "Be brief!")
		}, []string{sys, msg}, nil},
		{"one character in an earlier message", sonnet, func(t *testing.T) string {
			return edit(t, base, "weather in Paris?", "weather in Paris!")
		}, []string{msg}, []string{sys}},
		{"another model", "claude-opus-4-1", func(*testing.T) string { return base }, []string{sys, msg}, nil},
		{"a tool's description", sonnet, func(t *testing.T) string {
			return edit(t, base, "Weather for a city", "Weather for a town")
		}, []string{sys, msg}, nil},
		{"a tool's schema", sonnet, func(t *testing.T) string {
			return edit(t, base, `{"city": {"type": "string"}}`, `{"city": {"type": "string"}, "days": {"type": "integer"}}`)
		}, []string{sys, msg}, nil},
		{"another tool", sonnet, func(t *testing.T) string {
			return edit(t, base, `"tools": [`, `"tools": [{"name": "noop", "input_schema": {"type": "object"}}, `)
		}, []string{sys, msg}, nil},
		{"a tool parameter named cache_control is content", sonnet, func(t *testing.T) string {
			return edit(t, base, `{"city": {"type": "string"}}`, `{"city": {"type": "string"}, "cache_control": {"type": "ephemeral"}}`)
		}, []string{sys, msg}, nil},
		{"tool_choice, for message prefixes", sonnet, func(t *testing.T) string {
			return edit(t, base, `"max_tokens": 1024`, `"max_tokens": 1024, "tool_choice": {"type": "auto"}`)
		}, []string{msg}, []string{sys}},
		{"thinking, for message prefixes", sonnet, func(t *testing.T) string {
			return edit(t, base, `"max_tokens": 1024`, `"max_tokens": 1024, "thinking": {"type": "enabled", "budget_tokens": 1024}`)
		}, []string{msg}, []string{sys}},
		{"a role", sonnet, func(t *testing.T) string {
			return edit(t, base, `{"role": "user", "content": "What's`, `{"role": "assistant", "content": "What's`)
		}, []string{msg}, []string{sys}},
		{"a number's spelling", sonnet, func(t *testing.T) string {
			return edit(t, base, `"tool_use_id": "tu_1", "content"`, `"tool_use_id": "tu_1", "n": 1.0, "content"`)
		}, []string{msg}, []string{sys}},
		{"system text moved to the first message", sonnet, func(t *testing.T) string {
			b := edit(t, base, `"text": "You are a helpful assistant.\nBe brief.", `, `"text": "You are a helpful assistant.", `)
			return edit(t, b, `"content": "What's the weather in Paris?"`, `"content": [{"type": "text", "text": "\nBe brief."}, {"type": "text", "text": "What's the weather in Paris?"}]`)
		}, []string{sys, msg}, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := mustParse(t, tc.model, tc.body(t), quarter)
			for _, path := range tc.paths {
				if a, b := at(t, orig, path).Hash, at(t, got, path).Hash; a == b {
					t.Errorf("%s: hash unchanged: %s", path, a)
				}
			}
			for _, path := range tc.same {
				if a, b := at(t, orig, path).Hash, at(t, got, path).Hash; a != b {
					t.Errorf("%s: hash changed: %s → %s", path, a, b)
				}
			}
		})
	}

	// Message boundaries are part of the prefix.
	one := mustParse(t, sonnet, `{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b","cache_control":{"type":"ephemeral"}}]}]}`, quarter)
	two := mustParse(t, sonnet, `{"messages":[{"role":"user","content":[{"type":"text","text":"a"}]},{"role":"user","content":[{"type":"text","text":"b","cache_control":{"type":"ephemeral"}}]}]}`, quarter)
	if one[0].Hash == two[0].Hash {
		t.Error("splitting a message does not change the hash")
	}
	// Tools and system blocks are not interchangeable.
	tool := mustParse(t, sonnet, `{"tools":[{"type":"text","text":"a","cache_control":{"type":"ephemeral"}}]}`, quarter)
	sys := mustParse(t, sonnet, `{"system":[{"type":"text","text":"a","cache_control":{"type":"ephemeral"}}]}`, quarter)
	if tool[0].Hash == sys[0].Hash {
		t.Error("a tool and a system block hash alike")
	}
}

func TestLaterBreakpointIncludesEarlier(t *testing.T) {
	body := `{"tools":[{"name":"a","n":100,"cache_control":{"type":"ephemeral"}}],
		"system":[{"type":"text","text":"s","n":200}],
		"messages":[
			{"role":"user","content":[{"type":"text","text":"q1","n":300}]},
			{"role":"assistant","content":[{"type":"text","text":"a1","n":400}]},
			{"role":"user","content":[{"type":"text","text":"q2","n":500,"cache_control":{"type":"ephemeral"}}]},
			{"role":"assistant","content":[{"type":"text","text":"a2","n":10000}]}]}`
	p := mustParse(t, sonnet, body, declared)
	if len(p) != 2 || p[0].Tokens != 100 || p[1].Tokens != 1500 || p[0].Cacheable || !p[1].Cacheable {
		t.Fatalf("got %+v, want tokens 100 then 1500 (all blocks up to the breakpoint, none after)", p)
	}
	for _, change := range []struct{ old, new string }{
		{`"text":"s"`, `"text":"S"`},
		{`"text":"q1"`, `"text":"Q1"`},
		{`"text":"a1"`, `"text":"A1"`},
	} {
		q := mustParse(t, sonnet, edit(t, body, change.old, change.new), declared)
		if q[0].Hash != p[0].Hash {
			t.Errorf("%s: the tools prefix changed", change.new)
		}
		if q[1].Hash == p[1].Hash {
			t.Errorf("%s: the message prefix did not change", change.new)
		}
	}
	if q := mustParse(t, sonnet, edit(t, body, `"text":"a2"`, `"text":"A2"`), declared); q[1].Hash != p[1].Hash {
		t.Error("a message after the breakpoint changed its hash")
	}
}

// TestHashStable pins the encoding: a change here invalidates every hash
// computed before it, so it must be deliberate.
func TestHashStable(t *testing.T) {
	p := mustParse(t, sonnet, `{"system":[{"type":"text","text":"hi","cache_control":{"type":"ephemeral"}}]}`, quarter)
	want := sha256.New()
	frame := func(tag byte, b string) {
		var h [9]byte
		h[0] = tag
		h[8] = byte(len(b))
		want.Write(h[:])
		want.Write([]byte(b))
	}
	want.Write([]byte("sluice/cachekey/v1\x00"))
	frame('m', sonnet)
	frame('s', `{"text":"hi","type":"text"}`)
	if got := fmt.Sprintf("%x", want.Sum(nil)); p[0].Hash != got {
		t.Fatalf("hash = %s, want %s", p[0].Hash, got)
	}
}

func TestLongestAndUncached(t *testing.T) {
	p := Prefixes{
		{Tokens: 1100, Cacheable: true, Hash: "a"},
		{Tokens: 3000, Cacheable: true, Hash: "b"},
		{Tokens: 3000, Cacheable: true, Hash: "c"},
		{Tokens: 5000, Cacheable: false, Hash: "d"},
	}
	if l, ok := p.Longest(); !ok || l.Hash != "c" {
		t.Errorf("Longest = %+v %v, want c", l, ok)
	}
	if _, ok := (Prefixes{{Tokens: 10}}).Longest(); ok {
		t.Error("Longest found an uncacheable prefix")
	}
	if _, ok := Prefixes(nil).Longest(); ok {
		t.Error("Longest of nothing")
	}
	for _, tc := range []struct{ total, cached, want int }{
		{5000, 3000, 2000}, {5000, 0, 5000}, {5000, 5000, 0}, {5000, 6000, 0}, {5000, -1, 5000}, {0, 10, 0}, {-5, 0, 0},
	} {
		if got := Uncached(tc.total, tc.cached); got != tc.want {
			t.Errorf("Uncached(%d, %d) = %d, want %d", tc.total, tc.cached, got, tc.want)
		}
	}
}

func TestNilCount(t *testing.T) {
	p := mustParse(t, sonnet, `{"system":[{"type":"text","text":"hello","cache_control":{"type":"ephemeral"}}]}`, nil)
	if p[0].Tokens != 17 { // 67 bytes, rounded up
		t.Errorf("Tokens = %d", p[0].Tokens)
	}
}

func TestConcurrent(t *testing.T) {
	bodies := []string{base, benchBody(20 << 10), edit(t, base, "Paris", "Rome")}
	want := make([]Prefixes, len(bodies))
	for i, b := range bodies {
		want[i] = mustParse(t, sonnet, b, quarter)
	}
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 50; i++ {
				k := (g + i) % len(bodies)
				got, err := Parse(sonnet, json.RawMessage(bodies[k]), quarter)
				if err != nil || !reflect.DeepEqual(got, want[k]) {
					t.Errorf("concurrent Parse differs: %v", err)
					return
				}
			}
		}()
	}
	wg.Wait()
}

// ---- the scanner and the canonical form, against encoding/json ----

func canonical(raw []byte) ([]byte, bool) {
	sc := scanner{s: raw}
	i := skipWS(raw, 0)
	end, err := sc.value(i)
	if err != nil || skipWS(raw, end) != len(raw) {
		return nil, false
	}
	st := &state{}
	st.canonValue(raw, i, false)
	return st.buf, true
}

func decode(t *testing.T, b []byte) any {
	t.Helper()
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	var v any
	if err := d.Decode(&v); err != nil {
		t.Fatalf("decode %q: %v", b, err)
	}
	return v
}

// shuffled writes v as JSON with keys in reverse order, extra whitespace and
// every non-ASCII character escaped.
func shuffled(b *bytes.Buffer, v any) {
	switch v := v.(type) {
	case map[string]any:
		keys := make([]string, 0, len(v))
		for k := range v {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		slices.Reverse(keys)
		b.WriteString("{ ")
		for i, k := range keys {
			if i > 0 {
				b.WriteString(" ,\n")
			}
			escaped(b, k)
			b.WriteString(" :\t")
			shuffled(b, v[k])
		}
		b.WriteString(" }")
	case []any:
		b.WriteString("[ ")
		for i, e := range v {
			if i > 0 {
				b.WriteString(" , ")
			}
			shuffled(b, e)
		}
		b.WriteString("\r\n]")
	case string:
		escaped(b, v)
	default:
		x, _ := json.Marshal(v)
		b.Write(x)
	}
}

func escaped(b *bytes.Buffer, s string) {
	b.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"' || r == '\\':
			b.WriteString(`\` + string(r))
		case r == '/':
			b.WriteString(`\/`)
		case r < 0x20 || r > 0x7e:
			for _, u := range utf16.Encode([]rune{r}) {
				fmt.Fprintf(b, `\u%04X`, u)
			}
		default:
			b.WriteRune(r)
		}
	}
	b.WriteByte('"')
}

var jsonSeeds = []string{
	`{}`, `[]`, `""`, `0`, `-0.5e+10`, `true`, `null`, ` {"b":1,"a":[1,2,{"d":null,"c":"x"}]} `,
	`{"a":"\u00e9\ud83d\ude00\ud800x\"\\\/\b\f\n\r\t\u0001"}`, `{"é":1,"e":2,"\u00e9\u00e9":3,"":4}`,
	`{"a":1,"a":2}`, `[1,2,3,]`, `{"a":1}x`, `"\ud83d"`, `"abc\u0000def"`, `{"cache_control":1}`,
	"\"\xff\xfe\"", `01`, `1.`, `-`, `[[[[]]]]`, `{"k":"` + strings.Repeat("long text ", 20) + `"}`,
	`{"a" : { "b" : [ true , false , null ] } }`, `"a\u2028b"`, `1E5`, `{"A":1,"a":2,"B":3}`,
}

func FuzzCanonical(f *testing.F) {
	for _, s := range jsonSeeds {
		f.Add([]byte(s))
	}
	f.Add([]byte(base))
	f.Fuzz(func(t *testing.T, raw []byte) {
		c, ok := canonical(raw)
		if ok != json.Valid(raw) {
			t.Fatalf("scanner says valid=%v, encoding/json says %v", ok, !ok)
		}
		if !ok {
			return
		}
		if !json.Valid(c) {
			t.Fatalf("canonical form %q is not JSON", c)
		}
		if again, _ := canonical(c); !bytes.Equal(again, c) {
			t.Fatalf("not idempotent: %q → %q", c, again)
		}
		v := decode(t, raw)
		// (Keys of invalid UTF-8 that decode alike are duplicates whose
		// order canonicalisation may change; sluice's API refuses such
		// bodies before this package sees them.)
		if w := decode(t, c); utf8.Valid(raw) && !reflect.DeepEqual(v, w) {
			t.Fatalf("canonical form means something else: %q → %q", raw, c)
		}
		// Key order, whitespace and escaping do not matter.
		var b bytes.Buffer
		shuffled(&b, v)
		m, _ := json.Marshal(v)
		cs, ok1 := canonical(b.Bytes())
		cm, ok2 := canonical(m)
		if !ok1 || !ok2 || !bytes.Equal(cs, cm) {
			t.Fatalf("two spellings differ:\n%s → %s\n%s → %s", b.Bytes(), cs, m, cm)
		}
	})
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(base))
	f.Add([]byte(`{"messages":00`))
	f.Add([]byte(`{"system":"x","messages":[{"role":"user","content":[{"type":"text","text":"a","cache_control":{"type":"ephemeral","ttl":"1h"}}]}]}`))
	f.Fuzz(func(t *testing.T, raw []byte) {
		p, err := Parse(sonnet, raw, quarter)
		if err != nil {
			if !errors.Is(err, ErrInvalidJSON) && !errors.Is(err, ErrInvalidRequest) &&
				!errors.Is(err, ErrTooManyBreakpoints) && !errors.Is(err, ErrInvalidCacheControl) {
				t.Fatalf("unclassified error %v", err)
			}
			if errors.Is(err, ErrInvalidJSON) == json.Valid(raw) {
				t.Fatalf("ErrInvalidJSON (%v) disagrees with json.Valid", err)
			}
			return
		}
		if !json.Valid(raw) || len(p) > MaxBreakpoints {
			t.Fatalf("accepted %q: %v", raw, p)
		}
	})
}

// TestRandomJSON runs the canonical-form properties over generated documents.
func TestRandomJSON(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	var gen func(depth int) any
	gen = func(depth int) any {
		switch n := r.IntN(8); {
		case n == 0 || depth > 4:
			return []any{json.Number(strconv.Itoa(r.IntN(1000) - 500)), "x\u00e9\n\"", true, nil}[r.IntN(4)]
		case n < 4:
			m := map[string]any{}
			for k := r.IntN(6); k > 0; k-- {
				m[string(rune('a'+r.IntN(26)))+string(rune(0x3b1+r.IntN(3)))] = gen(depth + 1)
			}
			return m
		default:
			a := make([]any, r.IntN(5))
			for k := range a {
				a[k] = gen(depth + 1)
			}
			return a
		}
	}
	for range 500 {
		v := gen(0)
		var b bytes.Buffer
		shuffled(&b, v)
		m, _ := json.Marshal(v)
		cs, ok1 := canonical(b.Bytes())
		cm, ok2 := canonical(m)
		if !ok1 || !ok2 || !bytes.Equal(cs, cm) {
			t.Fatalf("two spellings differ:\n%s → %s\n%s → %s", b.Bytes(), cs, m, cm)
		}
		if !reflect.DeepEqual(decode(t, cs), decode(t, m)) {
			t.Fatalf("canonical form means something else: %s", cs)
		}
	}
}

// ---- benchmarks ----

// benchBody is a Messages request of about size bytes with three
// breakpoints: the last tool, the system prompt and the last-but-one user
// turn.
func benchBody(size int) string {
	var b strings.Builder
	b.WriteString(`{"model":"claude-sonnet-4-5","max_tokens":4096,"tools":[`)
	for i := 0; i < 6; i++ {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"name":"tool_%d","description":"Looks things up in index %d and returns the matching records as JSON.","input_schema":{"type":"object","properties":{"query":{"type":"string","description":"what to look for"},"limit":{"type":"integer","minimum":1,"maximum":100}},"required":["query"]}`, i, i)
		if i == 5 {
			b.WriteString(`,"cache_control":{"type":"ephemeral","ttl":"1h"}`)
		}
		b.WriteByte('}')
	}
	para := `You are a careful assistant. Answer in \"plain\" English; cite the record ids you used.\n` +
		`Les données sont en français aussi — 데이터도 있습니다. Code: func f(x int) int { return x*2 }\n`
	b.WriteString(`],"system":[{"type":"text","text":"`)
	for b.Len() < size/3 {
		b.WriteString(para)
	}
	b.WriteString(`","cache_control":{"type":"ephemeral","ttl":"1h"}}],"messages":[`)
	turn := 0
	for b.Len() < size-2000 {
		if turn > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"role":"user","content":[{"type":"text","text":"Question %d: %s"}]},`, turn, strings.Repeat("what about this? ", 40))
		fmt.Fprintf(&b, `{"role":"assistant","content":[{"type":"text","text":"Let me look."},{"type":"tool_use","id":"tu_%d","name":"tool_1","input":{"query":"q%d","limit":10}}]},`, turn, turn)
		fmt.Fprintf(&b, `{"role":"user","content":[{"type":"tool_result","tool_use_id":"tu_%d","content":"%s"}]}`, turn, strings.Repeat(`{\"id\":17,\"v\":\"x\"},`, 30))
		turn++
	}
	// The breakpoint on the last full turn, then one more question.
	s := b.String()
	k := strings.LastIndex(s, `"}]}`)
	s = s[:k] + `","cache_control":{"type":"ephemeral"}}]}`
	return s + `,{"role":"user","content":"And finally?"}]}`
}

func BenchmarkParse(b *testing.B) {
	body := json.RawMessage(benchBody(100 << 10))
	p, err := Parse(sonnet, body, quarter)
	if err != nil || len(p) != 3 {
		b.Fatalf("%v %v", p, err)
	}
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Parse(sonnet, body, quarter); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkParseShapes is Parse on other bodies: 1 MB with the same three
// breakpoints, 100 KB of prose with few escapes, and 100 KB without any
// breakpoint (only the validating scan runs).
func BenchmarkParseShapes(b *testing.B) {
	prose := strings.NewReplacer(`\"`, `'`, `\n`, ` `).Replace(benchBody(100 << 10))
	none := strings.ReplaceAll(benchBody(100<<10), `,"cache_control":{"type":"ephemeral","ttl":"1h"}`, "")
	none = strings.ReplaceAll(none, `,"cache_control":{"type":"ephemeral"}`, "")
	for _, tc := range []struct {
		name string
		body string
		bps  int
	}{
		{"1MB", benchBody(1 << 20), 3},
		{"100KB-prose", prose, 3},
		{"100KB-no-breakpoints", none, 0},
	} {
		b.Run(tc.name, func(b *testing.B) {
			body := json.RawMessage(tc.body)
			if p, err := Parse(sonnet, body, quarter); err != nil || len(p) != tc.bps {
				b.Fatalf("%v %v", p, err)
			}
			b.SetBytes(int64(len(body)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := Parse(sonnet, body, quarter); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkCanonical compares ways of getting to a key-order-independent
// form of the same 100 KB body, and what encoding/json costs to just read it.
func BenchmarkCanonical(b *testing.B) {
	body := []byte(benchBody(100 << 10))
	run := func(name string, f func() error) {
		b.Run(name, func(b *testing.B) {
			b.SetBytes(int64(len(body)))
			b.ReportAllocs()
			for b.Loop() {
				if err := f(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	run("cachekey.Parse", func() error { _, err := Parse(sonnet, body, quarter); return err })
	run("json.Valid", func() error {
		if !json.Valid(body) {
			return errors.New("invalid")
		}
		return nil
	})
	run("json.Unmarshal-structs", func() error {
		var req struct {
			Tools    []json.RawMessage `json:"tools"`
			System   json.RawMessage   `json:"system"`
			Messages []struct {
				Role    string          `json:"role"`
				Content json.RawMessage `json:"content"`
			} `json:"messages"`
		}
		return json.Unmarshal(body, &req)
	})
	run("json.Unmarshal-any+Marshal", func() error {
		d := json.NewDecoder(bytes.NewReader(body))
		d.UseNumber()
		var v any
		if err := d.Decode(&v); err != nil {
			return err
		}
		_, err := json.Marshal(v)
		return err
	})
	run("json.Compact", func() error {
		var out bytes.Buffer
		return json.Compact(&out, body)
	})
	run("sha256", func() error { sha256.Sum256(body); return nil })
}
