from cachecoord.cli import main

main()
