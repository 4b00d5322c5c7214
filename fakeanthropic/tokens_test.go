package fakeanthropic_test

import (
	"strings"
	"testing"

	"github.com/sluice-dev/sluice/fakeanthropic"
)

func TestCountTokens(t *testing.T) {
	image := `{"type":"image","source":{"type":"base64","media_type":"image/png","data":"iVBORw0KGgo="}}`
	tests := []struct {
		name string
		body string
		want int
	}{
		{"one short message", `{"messages":[{"role":"user","content":"Hello"}]}`, 8 + 4 + 2},
		{"empty text still has framing", `{"messages":[{"role":"user","content":""}]}`, 8 + 4},
		{"no messages", `{"model":"claude-x"}`, 8},
		{"text blocks like a string", `{"messages":[{"role":"user","content":[{"type":"text","text":"Hello"}]}]}`, 8 + 4 + 2},
		{"two blocks each rounded up", `{"messages":[{"role":"user","content":[{"type":"text","text":"abcde"},{"type":"text","text":"a"}]}]}`, 8 + 4 + 2 + 1},
		{"system string", `{"system":"Be brief.","messages":[{"role":"user","content":"Hi"}]}`, 8 + 3 + 4 + 1},
		{"system blocks", `{"system":[{"type":"text","text":"abcd"},{"type":"text","text":"abcde"}],"messages":[{"role":"user","content":"Hi"}]}`, 8 + 1 + 2 + 4 + 1},
		{"several messages", `{"messages":[{"role":"user","content":"abcd"},{"role":"assistant","content":"abcd"},{"role":"user","content":"abcd"}]}`, 8 + 3*(4+1)},
		{"utf-8 bytes, not runes", `{"messages":[{"role":"user","content":"안녕하세요"}]}`, 8 + 4 + 4},     // 15 bytes
		{"escapes count decoded", `{"messages":[{"role":"user","content":"a\nb\u00e9"}]}`, 8 + 4 + 2}, // 5 bytes
		{"other blocks by compact JSON", `{"messages":[{"role":"user","content":[` + image + `]}]}`, 8 + 4 + (len(image)+3)/4},
		{"whitespace in JSON does not count", `{"messages":[{"role":"user","content":[ {"type" : "image", "source" : {"type":"base64","media_type":"image/png","data":"iVBORw0KGgo="}} ]}]}`, 8 + 4 + (len(image)+3)/4},
		{"tools by compact JSON", `{"tools":[{"name":"x", "input_schema":{}}],"messages":[{"role":"user","content":"Hello"}]}`, 8 + 8 + 4 + 2}, // 31 bytes
		{"cache_control costs nothing", `{"tools":[{"name":"x","input_schema":{},"cache_control":{"type":"ephemeral"}}],"system":[{"type":"text","text":"abcd","cache_control":{"type":"ephemeral","ttl":"1h"}}],"messages":[{"role":"user","content":[` +
			image[:len(image)-1] + `,"cache_control":{"type":"ephemeral"}}]}]}`, 8 + 8 + 1 + 4 + (len(image)+3)/4},
		{"tool_choice does not count", `{"tool_choice":{"type":"auto"},"messages":[{"role":"user","content":"Hello"}]}`, 8 + 4 + 2},
		{"directives are text", `{"messages":[{"role":"user","content":"[[reply_tokens=5]]"}]}`, 8 + 4 + 5},
		{"long text", `{"messages":[{"role":"user","content":"` + strings.Repeat("x", 4001) + `"}]}`, 8 + 4 + 1001},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := fakeanthropic.CountTokens([]byte(tt.body))
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Errorf("CountTokens = %d, want %d", got, tt.want)
			}
		})
	}
}

func TestCountTokensErrors(t *testing.T) {
	for _, body := range []string{
		``,
		`[]`,
		`"text"`,
		`{"messages":"Hello"}`,
		`{"messages":[{"role":"robot","content":"x"}]}`,
		`{"messages":[{"role":"user","content":[{"type":"text","text":3}]}]}`,
		`{"system":5,"messages":[]}`,
	} {
		if n, err := fakeanthropic.CountTokens([]byte(body)); err == nil {
			t.Errorf("CountTokens(%s) = %d, want an error", body, n)
		}
	}
}
