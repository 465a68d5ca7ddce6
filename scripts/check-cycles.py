"""Module import circles inside each crate (comments and test modules ignored); exit 1 if any."""
import os, re, glob, sys

os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
found=0
for crate in sorted(glob.glob('crates/*/src')):
    mods={}
    for f in glob.glob(crate+'/**/*.rs',recursive=True):
        rel=re.sub(r'/mod$','',os.path.relpath(f,crate)[:-3])
        if rel in('lib','main'): continue
        txt=open(f).read()
        i=txt.find('#[cfg(test)]')
        if i>=0: txt=txt[:i]
        txt='\n'.join(l for l in txt.split('\n') if not l.strip().startswith('//'))
        mods[rel.replace('/','::')]=set(re.findall(r'crate::([a-z_]+(?:::[a-z_]+)?)',txt))
    names=set(mods)
    edges={m:set() for m in names}
    for m,ds in mods.items():
        for d in ds:
            c=d if d in names else d.split('::')[0]
            if c in names and c!=m and not m.startswith(c+'::') and not c.startswith(m+'::'): edges[m].add(c)
    def dfs(s):
        st=[(s,[s])]
        while st:
            n,p=st.pop()
            for e in edges[n]:
                if e==s: return p+[e]
                if e not in p: st.append((e,p+[e]))
    seen=set()
    for m in sorted(names):
        c=dfs(m)
        if c and frozenset(c) not in seen:
            seen.add(frozenset(c)); found+=1; print(crate,' -> '.join(c))
print(f"layout: {found} module import circles")
sys.exit(1 if found else 0)
