"""The local sandbox: a real Kubernetes control plane on one machine, for tests, benchmarks and the
demo (a development tool; nothing here ships in an image or runs on a cluster).

`control_plane.ControlPlane` runs etcd, kube-apiserver, kube-controller-manager and kube-scheduler
built from Go modules (`tools/kube/`); `node_agent.NodeAgent` registers nodes and runs the pods
bound to them as local processes; `cluster.SandboxCluster` installs the Helm chart and runs the
operator as its ServiceAccount; `kube_client.KubeClient` is the REST client the tools use;
`seed_data` builds a tiny model; `cli` is `loraresume-sandbox`.
"""
