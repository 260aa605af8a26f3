//go:build tools

// Package tools pins the Kubernetes control-plane commands that hack/cluster.sh builds.
// k8s.io/kubernetes is not meant to be required as a module: its go.mod replaces every
// k8s.io/* staging module with a local path, so this module replaces them with the
// published releases of the same version (the kubernetes-sigs/scheduler-plugins pattern).
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
