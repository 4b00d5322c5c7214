package api

import (
	"strings"
	"testing"

	"github.com/sluice-dev/sluice/config"
)

func TestFitsGroup(t *testing.T) {
	reserved := &config.ModelGroup{Name: "sonnet", InputTPM: 30000, OutputTPM: 8000, OutputAccounting: config.OutputReserved}
	produced := &config.ModelGroup{Name: "sonnet", InputTPM: 30000, OutputTPM: 8000, OutputAccounting: config.OutputProduced}
	tests := []struct {
		name       string
		g          *config.ModelGroup
		maxTokens  int
		input      int
		wantField  string
		wantNumber string
	}{
		{"fits", reserved, 8000, 30000, "", ""},
		{"max_tokens above the output limit (reserved)", reserved, 8001, 10, "request.max_tokens", "8000"},
		{"max_tokens above the output limit (produced): accepted", produced, 8192, 10, "", ""},
		{"input above the input limit", reserved, 100, 30001, "request.messages", "30,000"},
		{"input above the input limit (produced)", produced, 100, 30001, "request.messages", "30,000"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := fitsLimits(&createRequest{Group: tc.g, MaxTokens: tc.maxTokens}, tc.input, nil, config.UserPolicy{})
			if tc.wantField == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			e, ok := err.(*Error)
			if !ok || e.Status != 400 || e.Field != tc.wantField || !strings.Contains(e.Message, tc.wantNumber) {
				t.Fatalf("err = %v", err)
			}
		})
	}
}
